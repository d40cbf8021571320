"""`python -m bench gpu` on the CPU: the plan, the per-part budget machinery (with fake parts), the summary
writer (fabricated results), the `trl` peer's correctness gate, and the step bench's trl+gk wrapping.

No timing is asserted; the fabricated numbers only drive the met / not-met rendering.
"""

import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from bench import cli, gpu, measure, report, shapes
from bench.impls import REGISTRY

REPO = Path(__file__).resolve().parent.parent
OPTS = {"beta": 0.0, "epsilon_low": 0.2, "epsilon_high": 0.2, "loss_type": "dapo", "temperature": 1.0}


def test_dry_run_prints_every_part_with_its_budget(capsys):
    assert cli.main(["gpu", "--dry-run"]) == 0
    text = capsys.readouterr().out
    parts = gpu.plan()
    for p in parts:
        assert re.search(rf"\d\. {re.escape(p.name)}\s+{p.budget_s / 60:.2f} min", text), p.name
    assert "files: summary.md, gpu.log" in text
    # the whole plan fits in TOTAL_S (9.5 minutes) and its files in what the device tool brings back
    assert sum(p.budget_s for p in parts) <= gpu.TOTAL_S
    names = gpu.files_of(parts)
    assert len(names) <= gpu.MAX_FILES and len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)


def test_plan_measures_what_the_issue_asks():
    parts = {p.name: " ".join(p.argv) for p in gpu.plan(pytest_timeout=True)}
    assert "-m gpu" in parts["gpu-tests"] and "--timeout" in parts["gpu-tests"]
    loss = parts["loss-8k"]
    for want in ("--tokens 8192", "--dtype bf16", "--zero-adv-frac 0,0.5", "llama3-8b", "--save-partial"):
        assert want in loss
    # ours-chunked:1024 instead of ours-chunked: auto picks chunked at this size on a GPU, so the plain name would
    # repeat ours-auto's row; the fixed chunk measures the sizing rule against a smaller buffer
    for impl in ("ours-auto", "ours-chunked:1024", "ours-fused", "torch", "trl", "liger", "liger-triton", "cce"):
        assert impl in loss.split("--impls ")[1].split()[0].split(",")
    assert "--tokens 65536" in parts["loss-64k"] and "ours-fused" in parts["loss-64k"]
    assert "logprobs" in parts["logprobs-16k"] and "--tokens 16384" in parts["logprobs-16k"]
    assert "--device cuda" in parts["step"] and "trl+gk" in parts["step"]
    assert "--timeout" not in " ".join(gpu.plan(pytest_timeout=False)[1].argv)
    hard = {p.name: p for p in gpu.plan()}["hardening"]
    assert hard.inline and hard.result is None and hard.capture is None and "_gpu_hardening" in hard.argv


def test_bad_gpu_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["gpu", "--parts", "nope", "--dry-run"])
    assert "--parts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["gpu", "--total-min", "0", "--dry-run"])
    assert "--total-min" in capsys.readouterr().err


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def _fake(name, budget, code, result=None, capture=None):
    return gpu.Part(name, budget, f"fake part {name}", ("-c", code), result=result, capture=capture)


def test_part_over_budget_is_killed_with_its_children_and_keeps_its_file(tmp_path):
    code = (
        "import subprocess, sys, time, pathlib\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "pathlib.Path('{scratch}/partial.json').write_text('{\"kept\": 1}')\n"
        "pathlib.Path('{scratch}/child.pid').write_text(str(child.pid))\n"
        "print('working', flush=True)\n"
        "time.sleep(120)\n"
    )
    part = _fake("slow", 3, code, result="partial.json")
    t0 = time.monotonic()
    oc = gpu.run_part(part, tmp_path, tmp_path / "slow.log", part.budget_s)
    assert time.monotonic() - t0 < 30
    assert oc.status == "timeout" and "killed at its budget" in oc.note
    assert json.loads((tmp_path / "partial.json").read_text()) == {"kept": 1}
    assert "working" in (tmp_path / "slow.log").read_text()
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # the grandchild got the group's signal too
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)


def _loss_rec(impl, tokens, ms, mib, zadv=0.0, **extra):
    case = shapes.Case("loss", "llama3-8b", 4096, 128256, tokens, 1024, "bf16", 0.0, zadv).to_dict()
    t = {"median_ms": ms, "p20_ms": ms * 0.99, "p80_ms": ms * 1.01, "reps": 10}
    return {"impl": impl, "case": case, "status": "ok", "time": t, "extra_bytes": int(mib * 2**20), **extra}


def _fabricated_results() -> dict:
    env = {"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "gemm": {"bf16": {"tflops": 800.0}},
           "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"}  # fmt: skip
    # floor at 800 TFLOP/s: 6*8192*4096*128256 / 8e14 s = 32.3 ms; 8NHV at 64k: 344 ms
    loss8 = {"env": env, "meta": {"mode": "loss", "complete": True, "impls": ["ours-auto", "torch", "trl", "liger"]},
             "records": [_loss_rec("ours-auto", 8192, 40.0, 100), _loss_rec("torch", 8192, 60.0, 1000),
                         _loss_rec("trl", 8192, 45.0, 300), _loss_rec("liger", 8192, 150.0, 200),
                         _loss_rec("ours-auto", 8192, 20.0, 90, zadv=0.5),
                         {"impl": "cce", "case": shapes.Case("loss", "llama3-8b", 4096, 128256, 8192, 1024, "bf16").to_dict(),
                          "status": "unavailable", "error": "cut_cross_entropy is not installed"}]}  # fmt: skip
    loss64 = {"env": env, "meta": {"mode": "loss", "complete": False, "impls": ["ours-auto", "ours-fused"]},
              "records": [_loss_rec("ours-fused", 65536, 600.0, 500)]}
    step = {"meta": {"mode": "step", "model": "tiny", "config": {"beta": 0.0}, "steps": 2, "warmup_steps": 1},
            "env": {"device_name": "NVIDIA H100 80GB HBM3"},
            "records": [{"variant": "ours-auto", "status": "ok", "step_s": 0.5, "peak_extra_bytes": {}},
                        {"variant": "trl+gk", "status": "unavailable", "error": "grpo_kernels.integrations.trl not found"}]}  # fmt: skip
    return {"env": {"device_name": "NVIDIA H100 80GB HBM3", "driver": "580.1", "torch": "2.11.0",
                    "imports": {"trl": "ok 1.16.0", "cut_cross_entropy": "unavailable: ModuleNotFoundError"}},
            "loss-8k": loss8, "loss-64k": loss64, "step": step,
            "gpu-tests": {"text": "....\n===== 5 passed, 120 deselected in 31.2s =====\n"}}  # fmt: skip


def test_summary_renders_targets_parts_and_tables():
    outcomes = [gpu.Outcome("env", 40, "ok", 12.0, 0, "", ["env.json"]),
                gpu.Outcome("gpu-tests", 80, "ok", 35.0, 0, "", ["gpu-tests.txt"]),
                gpu.Outcome("loss-8k", 150, "ok", 140.0, 0, "", ["loss-llama3-8b-n8k.json"]),
                gpu.Outcome("loss-64k", 75, "timeout", 75.0, -15, "killed at its budget of 75 s; what it wrote is kept"),
                gpu.Outcome("logprobs-16k", 60, "failed", 3.0, 1, "exit code 1"),
                gpu.Outcome("step", 60, "ok", 50.0, 0, "", ["step-tiny.json"])]  # fmt: skip
    md = gpu.render_summary({"commit": "0123abc", "date": "2026-12-01T10:00:00+00:00", "command": "python -m bench gpu"},
                            outcomes, _fabricated_results())  # fmt: skip
    assert "Commit: `0123abc`" in md and "NVIDIA H100 80GB HBM3" in md and "580.1" in md
    assert "| loss-64k | 1.25 | timeout | 75 |" in md and "| logprobs-16k | 1.00 | failed |" in md
    assert "5 passed, 120 deselected in 31.2s" in md
    rows = {line.split(" | ")[0].lstrip("| "): line for line in md.splitlines() if line.startswith("| llama3-8b")}

    def met(fragment):
        (line,) = [v for k, v in rows.items() if fragment in k]
        return line.split(" | ")[3]

    assert met("1.25x the 6NHV floor") == "met"  # 40 ms vs 32.3 ms
    assert met("1.3x faster than torch") == "met"  # 1.5x
    assert met("1.3x faster than trl") == "**not met**"  # 1.13x
    assert met("3x faster than liger") == "met"  # 3.75x
    assert met("15% of torch's") == "met"  # 10%
    assert met("15% of trl's") == "**not met**"  # 33%
    assert met("0.55x the time") == "met"  # 0.5x
    assert met("fused within 1.5x") == "**not met**"  # 600 ms vs 344 ms
    assert "## Loss, N=65536 (partial: the part was cut short)" in md
    assert "cce: unavailable (cut_cross_entropy is not installed)" in md
    assert "grpo_kernels.integrations.trl not found" in md


def test_summary_without_results_says_so():
    md = gpu.render_summary({}, [gpu.Outcome("env", 40, "timeout", 40.0)], {})
    assert "No loss results: no target could be checked." in md and "the env part left no env.json" in md


def test_runner_goes_on_after_failure_and_timeout_and_writes_at_most_8_files(tmp_path, capsys):
    src = tmp_path / "fabricated.json"
    src.write_text(json.dumps(_fabricated_results()["loss-8k"]))
    ok_code = f"import shutil; shutil.copyfile({str(src)!r}, '{{scratch}}/loss-llama3-8b-n8k.json')"
    parts = [_fake("boom", 20, "import sys; print('collecting'); sys.exit(3)", capture="gpu-tests.txt"),
             _fake("hang", 2, "import time; time.sleep(60)"),
             _fake("loss-8k", 20, ok_code, result="loss-llama3-8b-n8k.json")]  # fmt: skip
    out = tmp_path / "out"
    runner = gpu.Runner(parts, out, total_s=60, meta={"commit": "x"})
    outcomes = runner.run()
    assert [o.status for o in outcomes] == ["failed", "timeout", "ok"]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.md", "gpu.log", "gpu-tests.txt", "loss-llama3-8b-n8k.json"])
    assert len(files) <= gpu.MAX_FILES
    md = (out / "summary.md").read_text()
    assert "| boom | 0.33 | failed |" in md and "exit code 3" in md and "| hang | 0.03 | timeout |" in md
    assert ">= 1.3x faster than torch" in md
    log = (out / "gpu.log").read_text()
    assert "collecting" in log and "part 2/3 hang: TIMEOUT" in log
    printed = capsys.readouterr().out
    assert "part 1/3 boom: started" in printed and "part 3/3 loss-8k: OK" in printed


def test_hardening_part_reports_inline_without_a_file_of_its_own(tmp_path):
    """The hardening part's PASS / FAIL / INFO lines land in summary.md (the files that come back are limited)."""
    code = "print('noise'); print('PASS  probe torch.bfloat16: mm=True'); print('FAIL  nan fused: loss 0.1'); " \
           "print('hardening: 1 passed, 1 failed'); import sys; sys.exit(1)"
    part = gpu.Part("hardening", 20, "fake hardening", ("-c", code), inline=True)
    out = tmp_path / "out"
    outcomes = gpu.Runner([part], out, total_s=30, meta={}, echo=lambda *a, **k: None).run()
    assert outcomes[0].status == "failed" and outcomes[0].files == []
    assert sorted(p.name for p in out.iterdir()) == ["gpu.log", "summary.md"]
    md = (out / "summary.md").read_text()
    section = md.split("## GPU-hardening checks")[1]
    assert "PASS  probe torch.bfloat16" in section and "FAIL  nan fused" in section and "noise" not in section


def test_hardening_launches_every_kernel_compile_check_lists():
    """`bench _gpu_hardening`'s launch check has a launcher for each kernel of compile_check's list (the combine
    kernel runs inside the fused forward); on a machine without CUDA the command fails and says so."""
    import inspect

    from bench import hardening
    from grpo_kernels.compile_check import jobs_for

    src = inspect.getsource(hardening._launch_one)
    for name in {j.name for j in jobs_for(90)} - {"_combine_kernel"}:
        assert f'kernel == "{name}"' in src, name
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, "-m", "bench", "_gpu_hardening"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1 and "FAIL  device: no CUDA device" in proc.stdout


def test_total_budget_skips_parts_that_no_longer_fit(tmp_path):
    parts = [_fake("a", 30, "import time; time.sleep(60)"), _fake("b", 30, "print('never')")]
    outcomes = gpu.Runner(parts, tmp_path, total_s=6, meta={}, echo=lambda *a, **k: None).run()
    assert outcomes[0].status == "timeout" and 5 < outcomes[0].budget_s <= 6
    assert outcomes[1].status == "skipped"


# ------------------------------------------------------------------------------------------------ trl peer


@pytest.mark.parametrize("mode", ["loss", "logprobs"])
def test_trl_peer_passes_the_gate_on_cpu(mode):
    """TRL 1.16's ChunkedLogProbFunction (its torch fallback on CPU) + TRL's loss against the float64 oracle."""
    impl = REGISTRY["trl"]
    device = torch.device("cpu")
    if impl.unavailable(device, mode):
        pytest.skip(impl.unavailable(device, mode))
    gate = measure.correctness(impl, mode, "fp32", OPTS, device)
    assert gate["ok"], gate
    assert max(gate["errors"].values()) < 1e-5


def test_trl_peer_runs_without_trls_trainer_stack():
    """On the GPU image `datasets` may be missing: trl.trainer.utils then fails to import, and the backward's
    one call into it (maybe_gather_lm_head_ctx) gets a null context; the gate still passes."""
    pytest.importorskip("trl.kernels")
    code = (
        "import sys; sys.modules['datasets'] = None\n"
        "import torch\n"
        "from bench import measure\n"
        "from bench.impls import REGISTRY, trl_backward_context\n"
        "why = trl_backward_context()\n"
        "print('WHY', why)\n"
        "opts = dict(beta=0.0, epsilon_low=0.2, epsilon_high=0.2, loss_type='dapo', temperature=1.0)\n"
        "g = measure.correctness(REGISTRY['trl'], 'loss', 'fp32', opts, torch.device('cpu'))\n"
        "print('GATE', g['ok'], max(g['errors'].values()))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "WHY import trl.trainer.utils failed" in done.stdout and "null context" in done.stdout
    assert "GATE True" in done.stdout


# ------------------------------------------------------------------------------------------------ step: trl+gk


def test_trl_gk_variant_is_unavailable_without_the_integration(monkeypatch):
    from bench import step

    monkeypatch.setitem(sys.modules, "grpo_kernels.integrations", None)
    gkt, why = step._gk_trl_integration()
    assert gkt is None and why == "grpo_kernels.integrations.trl not found"


def test_patch_and_unpatch_wrap_only_the_trl_gk_variant(monkeypatch):
    from bench import step

    monkeypatch.setattr(step, "_trl_unavailable", lambda: None)
    state = {"patched": False, "calls": []}
    fake = types.ModuleType("grpo_kernels.integrations.trl")
    fake.patch = lambda: state.update(patched=True)
    fake.unpatch = lambda: state.update(patched=False)
    pkg = types.ModuleType("grpo_kernels.integrations")
    pkg.trl = fake
    monkeypatch.setitem(sys.modules, "grpo_kernels.integrations", pkg)
    monkeypatch.setitem(sys.modules, "grpo_kernels.integrations.trl", fake)

    def fake_run_trl(task, device):
        state["calls"].append((task["variant"], state["patched"]))
        if task.get("explode"):
            raise RuntimeError("trainer failed")
        return {"per_step": [{"step": 1.0, "generation": 0.1, "scoring": 0.1, "update": 0.8}], "peak_extra_bytes": {},
                "process_peak_bytes": 0}  # fmt: skip

    monkeypatch.setattr(step, "_run_trl", fake_run_trl)
    got = []
    base = {"model": "tiny", "config": {}, "device": "cpu", "seed": 0}
    step.run_step_task({**base, "variant": "trl"}, got.append)
    step.run_step_task({**base, "variant": "trl+gk"}, got.append)
    step.run_step_task({**base, "variant": "trl+gk", "explode": True}, got.append)
    assert state["calls"] == [("trl", False), ("trl+gk", True), ("trl+gk", True)]
    assert state["patched"] is False  # undone after the failing run too
    assert [r["status"] for r in got] == ["ok", "ok", "error"]


def test_every_bench_part_parses_and_targets_the_issue_shapes():
    """The GPU run is blind: each part's command line must parse as the bench CLI reads it."""
    parser = cli.build_parser()
    for p in gpu.plan():
        if p.argv[:2] != ("-m", "bench") or p.argv[2].startswith("_"):
            continue
        args = parser.parse_args([a.replace("{scratch}", "/tmp/x") for a in p.argv[2:]])
        if args.command in ("loss", "logprobs"):
            device = "cuda"
            cases, opts, timing = cli.sweep_config(args, device)
            assert {(c.hidden, c.vocab, c.dtype) for c in cases} == {(4096, 128256, "bf16")}
            assert all(c.tokens % c.seq_len == 0 for c in cases) and args.save_partial and args.no_markdown
            from bench.impls import resolve_impls

            assert resolve_impls(args.impls, args.command, torch.device("cpu"))  # every name is registered
        else:
            from bench import step

            assert args.command == "step" and args.device == "cuda"
            assert set(args.impls.split(",")) <= set(step.VARIANTS)


def test_sigterm_to_the_command_stops_the_part_and_keeps_the_summary(tmp_path):
    """A timeout around `python -m bench gpu` (SIGTERM) kills the running part's group and leaves summary.md."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from bench import gpu\n"
        "parts = [gpu.Part('sleepy', 120, 'sleeps', ('-c', 'import time; time.sleep(120)'))]\n"
        "import signal; signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))\n"
        f"gpu.Runner(parts, Path({str(tmp_path / 'out')!r}), 300, {{}}).run()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until the part has started
        if "sleepy: started" in line:
            break
    time.sleep(1.0)
    proc.terminate()
    assert proc.wait(timeout=30) == 128 + 15
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| sleepy | 2.00 | interrupted |" in md


def test_pytest_tail_of_a_verbose_run_cut_short_names_its_failures():
    text = ("tests/test_fsdp.py::test_one_gpu FAILED [  1%]\ntests/test_gpu.py::test_a PASSED [  2%]\n"
            "tests/test_gpu.py::test_b SKIPPED (needs 2 GPUs) [  3%]\ntests/test_gpu.py::test_c PASSED [  4%]\n")
    assert gpu._pytest_tail(text) == "cut short after 2 passed, 1 failed, 1 skipped: tests/test_fsdp.py::test_one_gpu"
    done = text + "==== 1 failed, 2 passed, 1 skipped in 3.00s ====\n"
    assert gpu._pytest_tail(done) == "1 failed, 2 passed, 1 skipped in 3.00s"
