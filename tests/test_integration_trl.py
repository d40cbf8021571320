"""grpo_kernels.integrations.trl: the stand-ins against float64 and TRL's own function, the hand-back cases,
patch()/unpatch() bindings, and TRL's GRPOTrainer run unpatched vs patched (installed TRL, plus TRL 1.13 in a
temporary --target install when PyPI is reachable)."""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import types
from pathlib import Path

import pytest
import torch

from conftest import rel_err

trl = pytest.importorskip("trl")
from grpo_kernels.integrations import trl as gkt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FP32_TOL = 1e-4
LP_ENT = ("log_probs", "entropy")


@pytest.fixture(autouse=True)
def _unpatched_after():
    yield
    gkt.unpatch()


@pytest.fixture
def patched():
    names = gkt.patch()
    gkt.reset_call_counts()
    return names


def _problem(N=37, H=24, V=53, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    b = (0.5 * torch.randn(V, generator=g)).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, b, targets


def _reference(hidden, weight, bias, targets, temperature, logit_scale):
    z = logit_scale * (hidden.double() @ weight.double().T + (0 if bias is None else bias.double())) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    return logp_all.gather(1, targets[:, None]).squeeze(1), -(logp_all.exp() * logp_all).sum(-1)


def _leaves(*xs, dtype=None):
    return [None if x is None else x.detach().to(dtype or x.dtype).clone().requires_grad_(True) for x in xs]


@pytest.mark.parametrize("bias, temperature, logit_scale", [(True, 0.7, 1.0), (False, 1.0, 1.3), (True, 1.2, 2)])
def test_stand_in_matches_float64(patched, bias, temperature, logit_scale):
    hidden, weight, b, targets = _problem(bias=bias)
    h, w, bb = _leaves(hidden, weight, b)
    out = gkt.ChunkedLogProbFunction.apply(h, w, bb, targets, temperature, 32768, None, logit_scale, LP_ENT)
    assert gkt.call_counts() == {"ours": 1, "trl": 0}
    assert len(out) == 5 and out[2:] == (None, None, None)
    logp, entropy = out[:2]
    assert logp.shape == entropy.shape == (hidden.shape[0],) and logp.dtype == entropy.dtype == torch.float32
    hr, wr, br = _leaves(hidden, weight, b, dtype=torch.float64)
    ref_logp, ref_entropy = _reference(hr, wr, br, targets, temperature, logit_scale)
    assert rel_err(logp, ref_logp) < FP32_TOL and rel_err(entropy, ref_entropy) < FP32_TOL
    g = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(1))
    (logp * g).sum().backward()
    (ref_logp * g.double()).sum().backward()
    for got, ref in ((h, hr), (w, wr)) + (((bb, br),) if bias else ()):
        assert rel_err(got.grad, ref.grad) < FP32_TOL


def test_stand_in_entropy_gradient_matches_float64(patched):
    """TRL's entropy bonus differentiates the entropy. Needs grpo_kernels' differentiable entropy."""
    hidden, weight, b, targets = _problem(N=19, V=41, seed=2)
    h, w, bb = _leaves(hidden, weight, b)
    logp, entropy, *_ = gkt.ChunkedLogProbFunction.apply(h, w, bb, targets, 0.9, 32768, None, 1.0, LP_ENT)
    hr, wr, br = _leaves(hidden, weight, b, dtype=torch.float64)
    ref_logp, ref_entropy = _reference(hr, wr, br, targets, 0.9, 1.0)
    g = torch.Generator().manual_seed(3)
    a, c = torch.randn(19, generator=g), torch.randn(19, generator=g)
    ((logp * a).sum() + (entropy * c).sum()).backward()
    ((ref_logp * a.double()).sum() + (ref_entropy * c.double()).sum()).backward()
    for got, ref in ((h, hr), (w, wr), (bb, br)):
        assert rel_err(got.grad, ref.grad) < FP32_TOL


def test_stand_in_agrees_with_trls_own_function(patched):
    hidden, weight, b, targets = _problem(N=29, V=47, seed=4)
    original = gkt._originals[gkt.ChunkedLogProbFunction]
    results = []
    for fn in (original, gkt.ChunkedLogProbFunction):
        h, w, bb = _leaves(hidden, weight, b)
        logp, entropy, *_ = fn.apply(h, w, bb, targets, 0.8, 16, None, 1.0, LP_ENT)
        (logp * torch.linspace(-1, 1, 29)).sum().backward()
        results.append((logp, entropy, h.grad, w.grad, bb.grad))
    for ours, theirs in zip(results[1], results[0]):
        assert rel_err(ours, theirs) < FP32_TOL


def test_trl_1_14_stand_in_matches_float64():
    """TRL 1.14's form: 8 arguments, (log-probs, entropy) out (its layout is run for real in the slow test below)."""
    hidden, weight, b, targets = _problem(N=21, V=43, seed=11)
    h, w, bb = _leaves(hidden, weight, b)
    gkt.reset_call_counts()
    out = gkt.ChunkedLogProbFunctionV114.apply(h, w, bb, targets, 0.8, 4096, None, 1.5)
    assert len(out) == 2 and gkt.call_counts() == {"ours": 1, "trl": 0}
    hr, wr, br = _leaves(hidden, weight, b, dtype=torch.float64)
    ref_logp, ref_entropy = _reference(hr, wr, br, targets, 0.8, 1.5)
    assert rel_err(out[0], ref_logp) < FP32_TOL and rel_err(out[1], ref_entropy) < FP32_TOL
    out[0].sum().backward()
    ref_logp.sum().backward()
    for got, ref in ((h, hr), (w, wr), (bb, br)):
        assert rel_err(got.grad, ref.grad) < FP32_TOL


def test_outputs_without_entropy_return_none(patched):
    hidden, weight, b, targets = _problem()
    out = gkt.ChunkedLogProbFunction.apply(hidden, weight, b, targets, 1.0, 32768, None, 1.0, ("log_probs",))
    assert out[1:] == (None, None, None, None) and out[0].shape == (hidden.shape[0],)


def test_autocast_computes_in_the_autocast_dtype_with_fp32_outputs(patched):
    """Under bf16 autocast (TRL's default bf16=True, also on the CPU) TRL computes in bf16: so do we."""
    hidden, weight, b, targets = _problem(N=23, V=45, seed=6)
    h, w, bb = _leaves(hidden, weight, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, entropy, *_ = gkt.ChunkedLogProbFunction.apply(h, w, bb, targets, 1.0, 32768, None, 1.0, LP_ENT)
    assert logp.dtype == entropy.dtype == torch.float32
    rounded = [x.to(torch.bfloat16) for x in (hidden, weight, b)]
    ref_logp, ref_entropy = _reference(*rounded, targets, 1.0, 1.0)
    assert rel_err(logp, ref_logp) < 1e-2 and rel_err(entropy, ref_entropy) < 1e-2
    logp.sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32 and torch.isfinite(h.grad).all()


@pytest.mark.parametrize("case", ["softcapping", "extra_outputs", "negative_target", "target_past_vocab",
                                  "logit_scale_0", "empty", "zero3_weight"])
def test_hands_back_to_trl_for_what_it_does_not_compute(patched, case):
    hidden, weight, b, targets = _problem(N=17, V=31, seed=7)
    args = dict(sc=None, scale=1.0, outputs=LP_ENT)
    if case == "softcapping":
        args["sc"] = 3.0
    elif case == "extra_outputs":
        args["outputs"] = ("log_probs", "entropy", "mean_logits")
    elif case == "negative_target":
        targets[3] = -100
    elif case == "target_past_vocab":
        targets[5] = weight.shape[0]
    elif case == "logit_scale_0":
        args["scale"] = 0.0
    elif case == "zero3_weight":
        weight = weight.clone()
        weight.ds_id = 0  # DeepSpeed ZeRO-3 marks its partitioned parameters so
    else:
        hidden, targets = hidden[:0], targets[:0]
    original = gkt._originals[gkt.ChunkedLogProbFunction]
    expected = original.apply(hidden, weight, b, targets, 1.0, 32768, args["sc"], args["scale"], args["outputs"])
    got = gkt.ChunkedLogProbFunction.apply(hidden, weight, b, targets, 1.0, 32768, args["sc"], args["scale"],
                                           args["outputs"])
    assert gkt.call_counts() == {"ours": 0, "trl": 1}
    for x, y in zip(got, expected):
        assert (x is None and y is None) or torch.equal(x, y)


def test_patch_rebinds_what_trl_looks_up_and_unpatch_restores():
    import trl.trainer.utils as utils

    original = utils._ChunkedLogProbFunction
    assert not gkt.is_patched()
    names = gkt.patch()
    assert "trl.trainer.utils._ChunkedLogProbFunction" in names
    assert utils._ChunkedLogProbFunction is gkt.ChunkedLogProbFunction
    assert gkt.patch() == names  # idempotent
    # a TRL module imported after patch() copies ours (`from .utils import ...`); unpatch() restores it too
    late = types.ModuleType("trl._gk_late_import")
    late._ChunkedLogProbFunction = utils._ChunkedLogProbFunction
    sys.modules[late.__name__] = late
    try:
        gkt.unpatch()
        assert late._ChunkedLogProbFunction is original
    finally:
        del sys.modules[late.__name__]
    assert utils._ChunkedLogProbFunction is original and not gkt.is_patched()
    gkt.unpatch()  # no-op
    with gkt.patched():
        assert utils._ChunkedLogProbFunction is gkt.ChunkedLogProbFunction
    assert utils._ChunkedLogProbFunction is original


def test_liger_named_loss_takes_ligers_keywords_and_defaults():
    """The class TRL 0.17-1.13 construct: Liger's keywords; what old TRL leaves out gets Liger's values of then."""
    import grpo_kernels as gk

    loss = gkt.LigerGRPOLoss(beta=0.04, epsilon_low=0.2, epsilon_high=0.2, temperature=0.9, use_ref_model=True)
    assert isinstance(loss, gk.FusedLinearGRPOLoss)
    assert (loss.loss_type, loss.beta, loss.temperature) == ("bnpo", 0.04, 0.9)
    hidden, weight, b, _ = _problem(N=2 * 5, V=29, seed=8)
    ids = torch.randint(0, 29, (2, 5), generator=torch.Generator().manual_seed(9))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    adv = torch.tensor([0.7, -1.1])
    ref = torch.randn(2, 5, generator=torch.Generator().manual_seed(10)) - 3
    gkt.reset_call_counts()
    out, metrics = loss(_input=hidden.view(2, 5, -1), lin_weight=weight, selected_token_ids=ids, attention_mask=mask,
                        advantages=adv, bias=b, ref_per_token_logps=ref, old_per_token_logps=None)
    expected, exp_metrics = gk.fused_linear_grpo_loss(hidden.view(2, 5, -1), weight, ids, mask, adv, bias=b,
                                                      ref_per_token_logps=ref, beta=0.04, loss_type="bnpo",
                                                      temperature=0.9)
    assert gkt.call_counts()["ours"] == 1
    assert torch.equal(out, expected) and torch.equal(metrics[0], exp_metrics[0])


def test_liger_named_loss_under_zero3_uses_the_chunked_strategy():
    """ZeRO-3 re-partitions the head after TRL's gather: the loss must not read the weight in its backward."""
    import grpo_kernels as gk

    hidden, weight, b, _ = _problem(N=2 * 6, V=23, seed=12)
    ids = torch.randint(0, 23, (2, 6), generator=torch.Generator().manual_seed(13))
    mask, adv = torch.ones(2, 6), torch.tensor([1.0, -0.5])
    loss = gkt.LigerGRPOLoss(beta=0.0, loss_type="dapo", strategy="fused")
    w = weight.clone().requires_grad_(True)
    w.ds_id = 0
    out, _ = loss(hidden.view(2, 6, -1), w, ids, mask, adv)
    assert loss.options.strategy == "chunked"
    out.backward()
    w2 = weight.clone().requires_grad_(True)
    expected, _ = gk.fused_linear_grpo_loss(hidden.view(2, 6, -1), w2, ids, mask, adv, strategy="chunked")
    expected.backward()
    assert torch.equal(out, expected) and torch.equal(w.grad, w2.grad)


# ------------------------------------------------------------------------------------ TRL's GRPOTrainer

def _reward(completions, **kwargs):
    return [float(c.count("a")) + 0.1 * len(c) for c in completions]


def _grpo_steps(patch: bool, **extra):
    """Three optimizer steps of TRL's GRPOTrainer on one generation batch (num_iterations=3: ratios move off 1,
    clipping and KL are live), a tiny random Llama saved locally, fp32 (bf16=False), plain SGD (Adam's first
    steps turn rounding-level gradient differences into lr-sized parameter differences)."""
    import datasets

    from grpo.model import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.padding_side = "left"
    model = build_tiny_model(tok, seed=0, hidden_size=32)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(f"{d}/m")
        tok.save_pretrained(f"{d}/m")
        args = trl.GRPOConfig(output_dir=d, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                              max_steps=3, num_iterations=3, beta=0.04, loss_type="dapo", optim="sgd",
                              learning_rate=0.5, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                              save_strategy="no", seed=0, disable_tqdm=True, **extra)
        if patch:
            gkt.patch()
        try:
            trainer = trl.GRPOTrainer(model=f"{d}/m", reward_funcs=[_reward], args=args, processing_class=tok,
                                      train_dataset=datasets.Dataset.from_dict({"prompt": ["abc", "hello", "xyz a",
                                                                                           "aaa"] * 2}))
            trainer.train()
        finally:
            gkt.unpatch()
    return [h for h in trainer.state.log_history if "loss" in h]


def _assert_same_steps(got, expected, keys):
    assert len(got) == len(expected) == 3
    for step, (a, b) in enumerate(zip(got, expected), 1):
        for k in keys:
            assert abs(a[k] - b[k]) <= 1e-5 * abs(b[k]) + 1e-7, f"step {step} {k}: patched {a[k]} vs TRL {b[k]}"


def _grpo_single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add spin-wait on the shared 2-core machine
    return before


@pytest.mark.slow
def test_grpo_trainer_patched_matches_unpatched_and_goes_through_our_kernels():
    import trl.trainer.utils as utils

    original = utils._ChunkedLogProbFunction
    threads = _grpo_single_thread()
    try:
        expected = _grpo_steps(False)
        gkt.reset_call_counts()
        got = _grpo_steps(True)
    finally:
        torch.set_num_threads(threads)
    counts = gkt.call_counts()
    # old log-probs once, reference log-probs once, one policy forward per step: all ours
    assert counts == {"ours": 5, "trl": 0}, counts
    assert utils._ChunkedLogProbFunction is original  # unpatched again
    assert expected[1]["kl"] > 0 and expected[1]["clip_ratio/region_mean"] > 0  # the test exercises KL and clipping
    _assert_same_steps(got, expected, ("loss", "grad_norm", "entropy", "kl", "clip_ratio/region_mean"))


@pytest.mark.slow
def test_grpo_trainer_entropy_bonus_patched_matches_unpatched():
    """entropy_coef != 0 backpropagates through the entropy. Needs grpo_kernels' differentiable entropy."""
    threads = _grpo_single_thread()
    try:
        expected = _grpo_steps(False, entropy_coef=0.5)
        got = _grpo_steps(True, entropy_coef=0.5)
    finally:
        torch.set_num_threads(threads)
    _assert_same_steps(got, expected, ("loss", "grad_norm", "entropy", "kl"))


# ------------------------------------------------------------------------------------ older TRLs (1.13, 1.14)

_OLD_TRL_RUN = textwrap.dedent('''
    """An older TRL's GRPOTrainer, 3 steps. argv[1]: 'ours' (patched) or 'trl' (unpatched); argv[2]: 'liger'
    (use_liger_kernel=True, which TRL 0.25-1.14 need to take their fused path; the fused GRPO loss of 1.13, or
    Liger's own before, gets compiled=False to spare a torch.compile on the CPU) or 'plain'. Prints one JSON line."""
    import functools, json, sys, tempfile
    # These TRL versions import vLLM's client when vLLM is installed, and predate the installed vLLM's API; their
    # GRPO loss never samples with it, so hide it (find_spec gives None for a None entry in sys.modules).
    sys.modules["vllm"] = None
    import torch, datasets, trl
    import trl.trainer.grpo_trainer as grpo_trainer
    from grpo.model import build_tiny_model, build_tiny_tokenizer
    from grpo_kernels.integrations import trl as gkt
    torch.set_num_threads(1)
    def reward(completions, **kw):
        return [float(c.count("a")) + 0.1 * len(c) for c in completions]
    tok = build_tiny_tokenizer(); tok.padding_side = "left"
    model = build_tiny_model(tok, seed=0, hidden_size=32)
    extra = {}
    if sys.argv[2] == "liger":
        off = {k: False for k in ("rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy")}
        extra = dict(use_liger_kernel=True, liger_kernel_config=off)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d + "/m"); tok.save_pretrained(d + "/m")
        args = trl.GRPOConfig(output_dir=d, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                              max_steps=3, num_iterations=3, beta=0.04, loss_type="dapo", optim="sgd",
                              learning_rate=0.5, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                              save_strategy="no", seed=0, disable_tqdm=True, **extra)
        names = []
        if sys.argv[1] == "ours":
            names = gkt.patch()
        elif sys.argv[2] == "liger":
            for name in ("FusedLinearGRPOLoss", "LigerFusedLinearGRPOLoss"):  # 1.13's copy; Liger's own before
                if hasattr(grpo_trainer, name):
                    setattr(grpo_trainer, name, functools.partial(getattr(grpo_trainer, name), compiled=False))
        tr = trl.GRPOTrainer(model=d + "/m", reward_funcs=[reward], args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_dict({"prompt": ["abc", "hello", "xyz a", "aaa"] * 2}))
        tr.train()
    gkt.unpatch()
    print(json.dumps({"version": trl.__version__, "patched": names, "counts": gkt.call_counts(),
                      "restored": "_ChunkedLogProbFunction" not in vars(grpo_trainer)
                                  or grpo_trainer._ChunkedLogProbFunction.__module__.startswith("trl."),
                      "loss_class": type(getattr(tr, "liger_loss", None)).__name__,
                      "steps": [{k: h.get(k) for k in ("loss", "grad_norm", "kl", "clip_ratio", "entropy",
                                                       "clip_ratio/region_mean")}
                                for h in tr.state.log_history if "loss" in h]}))
''')


def _run_old_trl(tmp_path, version, mode, liger):
    target = tmp_path / f"trl-{version}"
    if not target.exists():
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                              f"trl=={version}"], capture_output=True, text=True, timeout=300)
        if pip.returncode != 0:
            pytest.skip(f"could not install trl=={version} (no package index?): {pip.stderr.strip()[-300:]}")
    script = tmp_path / "run.py"
    script.write_text(_OLD_TRL_RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    proc = subprocess.run([sys.executable, str(script), mode, liger], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["version"] == version
    return out


@pytest.mark.slow
def test_trl_1_13_fused_grpo_loss_patched_matches_trls_own(tmp_path):
    """TRL 1.13 (the last with a Liger-style fused GRPO loss under use_liger_kernel) in a --target install: patched,
    it runs our loss class and gives TRL's own loss, grad norm, KL and clip ratio step by step."""
    pytest.importorskip("liger_kernel")  # TRL 1.13 and transformers refuse use_liger_kernel=True without it
    theirs = _run_old_trl(tmp_path, "1.13.0", "trl", "liger")
    ours = _run_old_trl(tmp_path, "1.13.0", "ours", "liger")
    assert "trl.trainer.grpo_trainer.FusedLinearGRPOLoss" in ours["patched"]
    assert ours["loss_class"] == "LigerGRPOLoss" and ours["counts"]["ours"] == 3
    assert theirs["loss_class"] == "FusedLinearGRPOLoss"
    assert theirs["steps"][1]["kl"] > 0 and theirs["steps"][1]["clip_ratio"] > 0
    _assert_same_steps(ours["steps"], theirs["steps"], ("loss", "grad_norm", "kl", "clip_ratio"))


@pytest.mark.slow
def test_trl_1_12_liger_grpo_loss_patched_matches_ligers(tmp_path):
    """TRL 1.12 (Liger's `LigerFusedLinearGRPOLoss` bound in grpo_trainer, the 0.17-1.12 layout) in a --target
    install: patched, TRL builds our class under Liger's name and gets Liger's loss, grad norm, KL and clip ratio."""
    pytest.importorskip("liger_kernel")
    theirs = _run_old_trl(tmp_path, "1.12.0", "trl", "liger")
    ours = _run_old_trl(tmp_path, "1.12.0", "ours", "liger")
    assert "trl.trainer.grpo_trainer.LigerFusedLinearGRPOLoss" in ours["patched"]
    assert ours["loss_class"] == "LigerGRPOLoss" and ours["counts"]["ours"] == 3
    assert theirs["loss_class"] == "LigerFusedLinearGRPOLoss"
    assert theirs["steps"][1]["kl"] > 0 and theirs["steps"][1]["clip_ratio"] > 0
    _assert_same_steps(ours["steps"], theirs["steps"], ("loss", "grad_norm", "kl", "clip_ratio"))


@pytest.mark.slow
def test_trl_1_14_chunked_logprob_patched_matches_trls_own(tmp_path):
    """TRL 1.14 (`_ChunkedLogProbFunction` in trl.trainer.utils, 8 arguments, imported by the trainers) in a
    --target install: every trainer binding is replaced, the GRPO run matches TRL's, unpatch() restores.
    TRL 1.14's GRPO takes that path only with use_liger_kernel=True, which needs liger-kernel installed."""
    pytest.importorskip("liger_kernel")
    theirs = _run_old_trl(tmp_path, "1.14.0", "trl", "liger")
    ours = _run_old_trl(tmp_path, "1.14.0", "ours", "liger")
    assert {"trl.trainer.utils._ChunkedLogProbFunction", "trl.trainer.grpo_trainer._ChunkedLogProbFunction",
            "trl.trainer.dpo_trainer._ChunkedLogProbFunction"} <= set(ours["patched"])
    assert ours["counts"] == {"ours": 5, "trl": 0} and ours["restored"]
    assert theirs["steps"][1]["kl"] > 0 and theirs["steps"][1]["clip_ratio/region_mean"] > 0
    _assert_same_steps(ours["steps"], theirs["steps"], ("loss", "grad_norm", "kl", "entropy",
                                                        "clip_ratio/region_mean"))
