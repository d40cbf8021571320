"""The benchmark suite's plumbing (bench/): tiny runs in-process, the correctness gate, the report files.

No timing is asserted: only that numbers exist, are finite and land in the JSON / Markdown.
"""

import json
import math

import pytest
import torch

from bench import cli, measure, report, shapes
from bench.impls import REGISTRY, Impl, _make_torch

TINY_TIMING = {"budget_s": 0.02, "min_reps": 2, "max_reps": 3, "warmup": 0, "memory": True, "gemm_budget_s": 0.02}
OPTS = {"beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.2, "loss_type": "dapo", "temperature": 1.0}


def _cases(mode="loss", tokens=(96, 192), **kw):
    return shapes.make_cases(mode, ["tiny"], list(tokens), 48, ["fp32"], [kw.get("pad", 0.0)], [kw.get("zadv", 0.0)])


def _suite(impls, mode="loss", cases=None, opts=OPTS, **kw):
    return report.finalize(
        cli.run_suite(mode, cases or _cases(mode), impls, opts, "cpu", TINY_TIMING, in_process=True, progress=False, **kw)
    )


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, doubled gradient: a plausible bug (right loss, wrong dH)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def _wrong_loss(mode, x, opts):
    fn = _make_torch(mode, x, opts)
    return lambda: fn() * 1.01


def _wrong_grad(mode, x, opts):
    def fn():
        xx = {**x, "hidden": _ScaleGrad.apply(x["hidden"])}
        return _make_torch(mode, xx, opts)()

    return fn


def test_parse_helpers():
    assert shapes.parse_tokens("1k, 4K,100") == [1024, 4096, 100]
    assert shapes.parse_floats("0,0.5", "--pad-frac") == [0.0, 0.5]
    assert shapes.parse_dtypes("bf16,fp32") == ["bf16", "fp32"]
    for bad in ("", "abc", "-3"):
        with pytest.raises(ValueError, match="--tokens"):
            shapes.parse_tokens(bad)
    with pytest.raises(ValueError, match="--pad-frac"):
        shapes.parse_floats("1.5", "--pad-frac")
    with pytest.raises(ValueError, match="--dtype"):
        shapes.parse_dtypes("int8")
    with pytest.raises(ValueError, match="--preset"):
        shapes.resolve_preset("no-such-model")
    assert shapes.resolve_preset("512x32000") == (512, 32000)


def test_cases_round_to_whole_sequences():
    cases = shapes.make_cases("loss", ["tiny", "llama3-8b"], [100, 4096], 48, ["fp32"], [0.0], [0.0, 0.5])
    assert len(cases) == 2 * 2 * 2
    for c in cases:
        assert c.tokens % c.seq_len == 0 and c.batch >= 1
    big = [c for c in cases if c.preset == "llama3-8b" and c.tokens == 4080][0]
    assert (big.hidden, big.vocab) == (4096, 128256)
    assert big.flops == 6.0 * 4080 * 4096 * 128256


def test_inputs_are_random_deterministic_and_sparse_as_asked():
    case = shapes.Case("loss", "tiny", 48, 640, 64 * 40, 64, "fp32", pad_frac=0.3, zero_adv_frac=0.5)
    a = shapes.make_inputs(case, "cpu", seed=3)
    b = shapes.make_inputs(case, "cpu", seed=3)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (a["hidden"] != 0).float().mean() > 0.99 and (a["weight"] != 0).float().mean() > 0.99
    real = shapes.realized_sparsity(a)
    assert real["zero_adv_frac"] == 0.5
    assert 0.2 < real["pad_frac"] < 0.4
    assert (a["mask"].sum(1) >= 1).all()  # every sequence keeps a real token
    # old log-probs are the policy's own, drifted a little: ratios near 1
    logp = shapes.policy_logprobs(a["hidden"].detach().view(-1, 48), a["weight"].detach(), a["ids"].view(-1), 1.0)
    assert (logp.view_as(a["old"]) - a["old"]).abs().max() < 1.0
    c = shapes.make_inputs(case, "cpu", seed=4)
    assert not torch.equal(a["hidden"], c["hidden"])


def test_inprocess_run_writes_json_markdown_and_plot(tmp_path):
    res = cli.run_suite(
        "loss", _cases(), ["torch", "ours-chunked"], OPTS, "cpu", TINY_TIMING, in_process=True, progress=False
    )
    res["meta"] = {"mode": "loss", "impls": ["torch", "ours-chunked"], "opts": OPTS, "date": "2026-01-01"}
    res = report.finalize(res)
    paths = report.write_all(res, tmp_path, "loss-tiny", plots=True)
    assert {p.suffix for p in paths} == {".json", ".md", ".png"}
    data = json.loads((tmp_path / "loss-tiny.json").read_text())
    assert data["env"]["device_type"] == "cpu" and data["env"]["torch"] == torch.__version__
    assert data["env"]["gemm"]["fp32"]["tflops"] > 0
    recs = data["records"]
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    for r in recs:
        t = r["time"]
        assert len(t["times_ms"]) == t["reps"] >= 2 and t["p20_ms"] <= t["median_ms"] <= t["p80_ms"]
        assert r["check"]["ok"] and max(r["check"]["errors"].values()) <= 1e-4
        assert set(r["check"]["errors"]) == {"loss", "d_hidden", "d_weight"}
        assert r["extra_bytes"] is not None and r["roofline"]["tflops"] > 0
        assert math.isfinite(r["roofline"]["x_floor"])
    base = [r for r in recs if r["impl"] == "torch"]
    assert all(r["speedup_vs_torch"] == 1.0 for r in base)
    md = (tmp_path / "loss-tiny.md").read_text()
    assert "ours-chunked" in md and "speed vs torch" in md and "tiny (H=48, V=640)" in md
    # `python -m bench report` rebuilds the same files from the JSON alone
    (tmp_path / "loss-tiny.md").unlink()
    assert cli.main(["report", str(tmp_path / "loss-tiny.json"), "--no-plots"]) == 0
    assert (tmp_path / "loss-tiny.md").read_text() == md


def test_correctness_gate_reports_wrong_impls_as_failed(monkeypatch):
    monkeypatch.setitem(REGISTRY, "wrong-loss", Impl("wrong-loss", ("loss",), "loss off by 1%", _wrong_loss))
    monkeypatch.setitem(REGISTRY, "wrong-grad", Impl("wrong-grad", ("loss",), "dH doubled", _wrong_grad))
    res = _suite(["torch", "wrong-loss", "wrong-grad"], cases=_cases(tokens=(96,)))
    by = {r["impl"]: r for r in res["records"]}
    assert by["torch"]["status"] == "ok"
    for name, bad_key in (("wrong-loss", "loss"), ("wrong-grad", "d_hidden")):
        r = by[name]
        assert r["status"] == "failed", r
        assert "time" not in r and "relative error above tolerance" in r["error"] and bad_key in r["error"]
        assert r["check"]["errors"][bad_key] > r["check"]["tol"]
    assert by["wrong-grad"]["check"]["errors"]["loss"] < 1e-4  # the loss itself was right
    md = report.to_markdown(res)
    assert "wrong-grad: FAILED the correctness gate" in md


def test_unavailable_and_erroring_impls_do_not_stop_the_sweep(monkeypatch):
    def boom(mode, x, opts):
        def fn():
            raise RuntimeError("kernel exploded")

        return fn

    monkeypatch.setitem(REGISTRY, "absent", Impl("absent", ("loss",), "", _make_torch, lambda d, m: "absent is not installed"))
    # passes the gate (small shape) but raises on the benchmark shapes
    flaky_calls = {"n": 0}

    def flaky(mode, x, opts):
        flaky_calls["n"] += 1
        return _make_torch(mode, x, opts) if flaky_calls["n"] == 1 else boom(mode, x, opts)

    monkeypatch.setitem(REGISTRY, "flaky", Impl("flaky", ("loss",), "", flaky))
    res = _suite(["absent", "flaky", "torch"], cases=_cases(tokens=(96,)))
    by = {r["impl"]: r for r in res["records"]}
    assert by["absent"]["status"] == "unavailable" and "not installed" in by["absent"]["error"]
    assert by["flaky"]["status"] == "error" and "kernel exploded" in by["flaky"]["error"]
    assert by["torch"]["status"] == "ok"


def test_shapes_that_cannot_fit_are_skipped(monkeypatch):
    monkeypatch.setattr(measure, "available_bytes", lambda device: 1 << 20)
    res = _suite(["torch"], cases=_cases(tokens=(96,)))
    (r,) = res["records"]
    assert r["status"] == "skipped" and "would not fit" in r["error"]


def test_logprobs_mode_inprocess():
    res = _suite(["torch", "ours-auto"], mode="logprobs", cases=_cases("logprobs", tokens=(96,), pad=0.25))
    for r in res["records"]:
        assert r["status"] == "ok", r.get("error")
        assert set(r["check"]["errors"]) == {"logp"} and r["check"]["errors"]["logp"] <= 1e-4
        assert r["case"]["flops"] == 2.0 * 96 * 48 * 640


def test_worker_subprocess_measures_memory():
    """The default path: each implementation in its own `python -m bench _worker` process."""
    res = cli.run_suite("loss", _cases(tokens=(96,)), ["torch"], OPTS, "cpu", TINY_TIMING, in_process=False, progress=False)
    (r,) = res["records"]
    assert r["status"] == "ok", r.get("error")
    assert isinstance(r["extra_bytes"], int) and r["time"]["median_ms"] > 0
    assert res["env"]["cpu_threads"] >= 1


def test_targets_are_evaluated_not_asserted():
    def rec(impl, ms, mem):
        case = shapes.Case("loss", "quick", 256, 8192, 4096, 256, "fp32").to_dict()
        return {"impl": impl, "case": case, "status": "ok", "time": {"median_ms": ms}, "extra_bytes": mem}

    res = {
        "env": {"device_type": "cpu", "gemm": {"fp32": {"tflops": 0.1}}},
        "records": [rec("torch", 100.0, 1000), rec("ours-fused", 50.0, 200), rec("ours-chunked", 150.0, 500)],
    }
    res = report.finalize(res)
    got = {(t["impl"], t["target"].split(": ")[1]): t["met"] for t in res["targets"]}
    assert got[("ours-fused", "faster than torch")] is True
    assert got[("ours-fused", "extra memory <= 25% of torch's")] is True
    assert got[("ours-chunked", "faster than torch")] is False
    assert got[("ours-chunked", "extra memory <= 25% of torch's")] is False
    # a GPU run without the H100 shape says what to run instead of claiming anything
    res["env"] = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "gemm": {}}
    targets = report.evaluate_targets(res)
    assert targets and all(t["met"] is None and "not measured" in t["note"] for t in targets)


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["loss", "--tokens", "abc"])
    assert "--tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["loss", "--impls", "nope", "--preset", "tiny", "--device", "cpu"])
    assert "unknown implementation" in capsys.readouterr().err


def test_phase_meter_separates_nested_phases():
    from bench.step import PhaseMeter

    meter = PhaseMeter(torch.device("cpu"))
    keep = []
    # Every block is over glibc's largest dynamic mmap threshold (32 MiB), so each one is fresh pages that raise
    # the RSS, whatever earlier tests left in the heap.
    with meter.phase("update"):
        keep.append(torch.ones(10 << 20))  # 40 MiB in the outer phase
        with meter.phase("generation"):
            tmp = torch.ones(36 << 20)  # 144 MiB, freed inside the inner phase
            del tmp
        keep.append(torch.ones(10 << 20))
    if not measure.reset_peak_rss():
        pytest.skip("peak RSS cannot be reset on this system")
    mib = {k: v / 2**20 for k, v in meter.peak.items()}
    assert 134 < mib["generation"] < 160, mib
    assert 75 < mib["update"] < 110, mib  # the inner phase's 144 MiB is not charged to the outer one
    assert set(meter.seconds) == {"update", "generation"}


def test_step_benchmark_runs_the_bundled_trainer(tmp_path):
    import importlib.util

    from bench import step

    parser = cli.build_parser()
    args = parser.parse_args(
        ["step", "--model", "tiny", "--steps", "1", "--warmup-steps", "0", "--impls", "ours-auto,trl", "--in-process",
         "--out", str(tmp_path)]
    )  # fmt: skip
    res = step.main(args)
    by = {r["variant"]: r for r in res["records"]}
    ours = by["ours-auto"]
    assert ours["status"] == "ok", ours.get("error")
    assert len(ours["per_step"]) == 1 and ours["step_s"] > 0
    assert all(ours[f"{p}_s"] is not None for p in step.PHASES)
    assert set(ours["peak_extra_bytes"]) == set(step.PHASES)  # the trainer's phase callbacks fed the meter
    # TRL's row runs wherever trl and datasets are installed (CI installs both), and says why not otherwise.
    trl_installed = all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets"))
    assert by["trl"]["status"] == ("ok" if trl_installed else "unavailable"), by["trl"].get("error")
    assert (tmp_path / "step-tiny.json").exists() and "ours-auto" in (tmp_path / "step-tiny.md").read_text()


@pytest.mark.parametrize("mode", ["loss", "logprobs"])
def test_liger_adapter_passes_the_gate(mode):
    """The Liger row is only meaningful if the adapter feeds Liger the same problem: gate it here."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed: pip install -e '.[test]'")
    impl = REGISTRY["liger"]
    device = torch.device("cpu")
    if impl.unavailable(device, mode):
        pytest.skip(impl.unavailable(device, mode))
    gate = measure.correctness(impl, mode, "fp32", OPTS, device)
    assert gate["ok"], gate


def test_sweep_saves_partial_json_after_each_implementation(tmp_path):
    """--save-partial: the JSON is rewritten after every implementation (a run killed at a time limit keeps what
    it measured); the final write marks it complete and --no-markdown leaves the JSON alone."""
    seen = []
    cli.run_suite("loss", _cases(tokens=(96,)), ["torch", "ours-chunked"], OPTS, "cpu", TINY_TIMING, in_process=True,
                  progress=False, on_job_done=lambda part: seen.append([r["impl"] for r in part["records"]]))  # fmt: skip
    assert seen == [["torch"], ["torch", "ours-chunked"]]
    argv = ["loss", "--preset", "tiny", "--tokens", "96", "--seq-len", "48", "--impls", "torch", "--device", "cpu",
            "--in-process", "--no-plots", "--no-markdown", "--save-partial", "--out", str(tmp_path), "--tag", "t",
            "--budget", "0.02", "--min-reps", "2", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["meta"]["complete"] is True and data["records"][0]["status"] == "ok"


def test_cpu_memory_counts_a_buffer_that_reuses_freed_heap_pages():
    """glibc keeps freed buffers under its dynamic mmap threshold in its heap; a later buffer placed on those pages
    raised neither RSS nor its peak, so the old VmHWM - VmRSS method read 0 for an 8 MiB buffer."""
    if not measure.reset_peak_rss():
        pytest.skip("needs /proc/self/clear_refs (Linux)")
    mib = 1 << 20
    big = torch.ones(24 * mib // 4)  # its free raises glibc's mmap threshold to 24 MiB (the maximum is 32 MiB)
    del big
    kept = [torch.ones(8 * mib // 4) for _ in range(2)]  # now from the heap: 16 MiB of pages, freed and kept
    del kept

    def run():
        torch.ones(8 * mib // 4).sum()

    extra, how, _ = measure.peak_extra_bytes(run, torch.device("cpu"))
    assert extra >= 7 * mib, (extra / mib, how)


def test_expected_buffer_of_the_chunked_strategy_and_of_full_logits():
    from bench.impls import expected_buffer_bytes

    case = shapes.Case(mode="loss", preset="quick", hidden=256, vocab=8192, tokens=1024, seq_len=512, dtype="fp32")
    cpu = torch.device("cpu")
    assert expected_buffer_bytes(REGISTRY["torch"], case, cpu) == 1024 * 8192 * 4
    # CPU chunks of 256 rows (the 32 MiB budget holds the fp32 buffer and the torch epilogue's two temporaries,
    # 12 bytes per vocabulary entry: 341 rows, balanced to 256): an 8 MiB buffer, and the fp32 dW accumulator
    # [V, H] for the 4 chunks
    assert expected_buffer_bytes(REGISTRY["ours-chunked"], case, cpu) == 256 * 8192 * 4 + 8192 * 256 * 4
    assert expected_buffer_bytes(REGISTRY["ours-auto"], case, cpu) == expected_buffer_bytes(REGISTRY["ours-chunked"],
                                                                                             case, cpu)
    assert expected_buffer_bytes(REGISTRY["ours-fused"], case, cpu) is None


def test_a_fixed_chunk_size_is_an_implementation_of_its_own(tmp_path):
    """`ours-chunked:ROWS` runs the chunked strategy with chunk_size=ROWS (a chunk-size sweep beside ours-auto):
    it passes the correctness gate in a worker process, and its expected buffer is ROWS rows (capped at N)."""
    from bench.impls import expected_buffer_bytes, get_impl

    argv = ["loss", "--preset", "tiny", "--tokens", "96", "--seq-len", "48", "--impls", "ours-chunked:32,ours-chunked:500",
            "--device", "cpu", "--no-plots", "--no-markdown", "--out", str(tmp_path), "--tag", "t", "--budget", "0.02",
            "--min-reps", "2", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    records = json.loads((tmp_path / "t.json").read_text())["records"]
    assert [(r["impl"], r["status"]) for r in records] == [("ours-chunked:32", "ok"), ("ours-chunked:500", "ok")]
    case = shapes.Case(mode="loss", preset="quick", hidden=256, vocab=8192, tokens=1024, seq_len=512, dtype="fp32")
    cpu = torch.device("cpu")
    assert expected_buffer_bytes(get_impl("ours-chunked:128"), case, cpu) == 128 * 8192 * 4 + 8192 * 256 * 4
    assert expected_buffer_bytes(get_impl("ours-chunked:4096"), case, cpu) == 1024 * 8192 * 4  # one chunk: no dW acc
    for bad in ("ours-chunked:0", "ours-chunked:x", "ours-chunked:"):
        with pytest.raises(ValueError, match="ours-chunked:ROWS"):
            get_impl(bad)


def test_a_fixed_chunk_size_reaches_the_api(monkeypatch):
    import functools

    import grpo_kernels as gk

    from bench.impls import get_impl

    seen = []
    monkeypatch.setattr(gk, "fused_linear_grpo_loss", lambda *a, **k: seen.append(k) or (None, None))
    monkeypatch.setattr(gk, "linear_logprobs", functools.wraps(gk.linear_logprobs)(lambda *a, **k: seen.append(k)))
    x = dict(hidden=None, weight=None, ids=None, mask=None, advantages=None, old=None)
    get_impl("ours-chunked:48").make("loss", x, {})()
    get_impl("ours-chunked:48").make("logprobs", x, {})()
    get_impl("ours-auto").make("loss", x, {})()
    assert [(k.get("strategy"), k.get("chunk_size")) for k in seen] == [("chunked", 48), ("chunked", 48), ("auto", None)]
