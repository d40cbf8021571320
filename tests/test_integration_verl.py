"""grpo_kernels.integrations.verl: verl's linear_cross_entropy semantics against float64, bad input, and patch()
on verl's module layout (verl itself does not import on this CPU machine: it needs ray and more)."""

import importlib.util
import inspect
import sys
import types

import pytest
import torch

from conftest import rel_err
from grpo_kernels.integrations import verl as gkv

FP32_TOL = 1e-4


def _problem(shape=(3, 7), H=24, V=53, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    labels = torch.randint(0, V, shape, generator=g)
    return hidden, weight, labels


def _reference(hidden, weight, labels, temperature):
    """float64: log softmax(h W^T / T)[label] and entropy per token, flattened as verl returns them."""
    z = (hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().T) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(1, labels.reshape(-1, 1)).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "MEAN"])
def test_values_and_logprob_gradients_match_float64(reduction):
    hidden, weight, labels = _problem()
    T = 0.7
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = gkv.linear_cross_entropy(h, w, labels, T, reduction)
    hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_logp, ref_entropy = _reference(hr, wr, labels, T)
    assert entropy.shape == (labels.numel(),) and entropy.dtype == torch.float32
    assert rel_err(entropy, ref_entropy) < FP32_TOL
    red = reduction.lower()
    assert logp.dtype == torch.float32
    if red == "none":
        assert logp.shape == (labels.numel(),)
        assert (logp <= 0).all()  # verl's sign: log-probs, not losses
        assert rel_err(logp, ref_logp) < FP32_TOL
        g = torch.randn(labels.numel(), generator=torch.Generator().manual_seed(1))
        (logp * g).sum().backward()
        (ref_logp * g.double()).sum().backward()
    else:
        ref = ref_logp.sum() if red == "sum" else ref_logp.mean()  # verl: mean over all N tokens
        assert logp.shape == () and rel_err(logp, ref) < FP32_TOL
        (1.3 * logp).backward()
        (1.3 * ref).backward()
    assert rel_err(h.grad, hr.grad) < FP32_TOL and h.grad.shape == hidden.shape
    assert rel_err(w.grad, wr.grad) < FP32_TOL


def test_entropy_gradient_matches_float64():
    """verl differentiates both outputs (entropy regularisation). Needs grpo_kernels' differentiable entropy."""
    hidden, weight, labels = _problem(shape=(11,), V=37, seed=3)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = gkv.linear_cross_entropy(h, w, labels, 1.0, "none")
    hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_logp, ref_entropy = _reference(hr, wr, labels, 1.0)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(11, generator=g), torch.randn(11, generator=g)
    ((logp * a).sum() + (entropy * b).sum()).backward()
    ((ref_logp * a.double()).sum() + (ref_entropy * b.double()).sum()).backward()
    assert rel_err(h.grad, hr.grad) < FP32_TOL
    assert rel_err(w.grad, wr.grad) < FP32_TOL


def test_bf16_inputs_give_fp32_outputs_close_to_float64():
    hidden, weight, labels = _problem(shape=(2, 9), V=45, dtype=torch.bfloat16, seed=5)
    logp, entropy = gkv.linear_cross_entropy(hidden, weight, labels, 0.9)
    ref_logp, ref_entropy = _reference(hidden, weight, labels, 0.9)  # float64 from the bf16-rounded inputs
    assert logp.dtype == entropy.dtype == torch.float32
    assert rel_err(logp, ref_logp) < 1e-2 and rel_err(entropy, ref_entropy) < 1e-2


def test_signature_is_verls():
    params = list(inspect.signature(gkv.linear_cross_entropy).parameters.items())
    assert [(n, p.default if p.default is not inspect.Parameter.empty else None) for n, p in params] == [
        ("hidden", None), ("weight", None), ("labels", None), ("temperature", 1.0), ("reduction", "none"),
        ("dist_process_group", None)]


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(temperature="1.0"), TypeError, "temperature"),
    (dict(temperature=True), TypeError, "temperature"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(reduction=None), ValueError, "reduction"),
])
def test_bad_options_raise_naming_them(kwargs, exc, word):
    hidden, weight, labels = _problem()
    with pytest.raises(exc, match=word):
        gkv.linear_cross_entropy(hidden, weight, labels, **kwargs)


def test_bad_labels_raise_naming_them():
    hidden, weight, labels = _problem()
    with pytest.raises(ValueError, match="labels"):
        gkv.linear_cross_entropy(hidden, weight, labels[:, :-1])
    bad = labels.clone()
    bad[0, 0] = -100
    with pytest.raises(ValueError, match="labels"):
        gkv.linear_cross_entropy(hidden, weight, bad)
    bad[0, 0] = weight.shape[0]
    with pytest.raises(ValueError, match="labels"):
        gkv.linear_cross_entropy(hidden, weight, bad)
    with pytest.raises(TypeError, match="labels"):
        gkv.linear_cross_entropy(hidden, weight, labels.tolist())


# ------------------------------------------------------------------------------------ patch() on verl's layout

@pytest.fixture
def fake_verl(monkeypatch):
    """verl's module layout where patch() looks: the kernel module defining `linear_cross_entropy`, and the
    Megatron forward that binds it at import time (`from verl.utils.kernel.linear_cross_entropy import ...`).
    The stand-in kernel records its calls."""
    calls = []

    def verl_linear_cross_entropy(hidden, weight, labels, temperature=1.0, reduction="none", dist_process_group=None):
        calls.append(dist_process_group)
        return "verl's own"

    names = ["verl", "verl.utils", "verl.utils.kernel", "verl.utils.kernel.linear_cross_entropy", "verl.models",
             "verl.models.mcore", "verl.models.mcore.model_forward_fused"]
    mods = {n: types.ModuleType(n) for n in names}
    mods["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy = verl_linear_cross_entropy
    mods["verl.models.mcore.model_forward_fused"].linear_cross_entropy = verl_linear_cross_entropy
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
        parent, _, child = n.rpartition(".")
        if parent:
            setattr(mods[parent], child, m)
    yield mods, verl_linear_cross_entropy, calls
    gkv.unpatch()


def test_patch_puts_ours_where_verl_looks_and_unpatch_restores(fake_verl):
    mods, original, calls = fake_verl
    names = gkv.patch()
    assert sorted(names) == ["verl.models.mcore.model_forward_fused.linear_cross_entropy",
                             "verl.utils.kernel.linear_cross_entropy.linear_cross_entropy"]
    assert gkv.patch() == names  # idempotent
    # verl's HF forwards import the name on each call; the Megatron forward uses its module global
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy
    assert linear_cross_entropy is gkv.linear_cross_entropy
    assert mods["verl.models.mcore.model_forward_fused"].linear_cross_entropy is gkv.linear_cross_entropy
    # a verl module imported after patch() copies ours; unpatch() restores it too
    late = types.ModuleType("verl.late_import")
    late.linear_cross_entropy = linear_cross_entropy
    sys.modules["verl.late_import"] = late
    try:
        gkv.reset_call_counts()
        hidden, weight, labels = _problem()
        logp, _ = mods["verl.models.mcore.model_forward_fused"].linear_cross_entropy(hidden, weight, labels, 1.0)
        assert gkv.call_counts() == {"ours": 1, "verl": 0} and logp.shape == (labels.numel(),)
        gkv.unpatch()
        assert not gkv.is_patched()
        assert mods["verl.utils.kernel.linear_cross_entropy"].linear_cross_entropy is original
        assert mods["verl.models.mcore.model_forward_fused"].linear_cross_entropy is original
        assert late.linear_cross_entropy is original
    finally:
        del sys.modules["verl.late_import"]
    assert calls == []


def test_process_group_goes_to_grpo_kernels_vocab_parallel(fake_verl, monkeypatch):
    _, _, calls = fake_verl
    gkv.patch()
    gkv.reset_call_counts()
    hidden, weight, labels = _problem()
    group = object()
    # ours is used and gets the group (world size > 1); verl's own function is never called
    seen = {}
    real = gkv.gk.linear_logprobs

    def with_group(hidden, weight, targets, bias=None, temperature=1.0, return_entropy=False, backend="auto",
                   strategy="auto", chunk_size=None, validate=True, process_group=None):
        seen["group"] = process_group
        return real(hidden, weight, targets, bias, temperature, return_entropy, backend, strategy, chunk_size,
                    validate)

    monkeypatch.setattr(gkv.gk, "linear_logprobs", with_group)
    monkeypatch.setattr(gkv, "_world_size", lambda g: 2)
    logp, entropy = gkv.linear_cross_entropy(hidden, weight, labels, 1.0, "sum", group)
    assert seen["group"] is group and logp.shape == () and entropy.shape == (labels.numel(),)
    assert calls == [] and gkv.call_counts() == {"ours": 1, "verl": 0}


def test_external_lib_module_patches_on_import(fake_verl):
    sys.modules.pop("grpo_kernels.integrations.verl_patch", None)
    try:
        import grpo_kernels.integrations.verl_patch as vp
        assert gkv.is_patched() and vp.patched_bindings
    finally:
        sys.modules.pop("grpo_kernels.integrations.verl_patch", None)


@pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="verl is not installed")
def test_patch_real_verl():
    try:
        import verl.utils.kernel.linear_cross_entropy as home
    except ImportError as e:  # verl installed without its runtime dependencies
        pytest.skip(f"verl does not import here: {e}")
    original = home.linear_cross_entropy
    try:
        assert "verl.utils.kernel.linear_cross_entropy.linear_cross_entropy" in gkv.patch()
        assert home.linear_cross_entropy is gkv.linear_cross_entropy
    finally:
        gkv.unpatch()
    assert home.linear_cross_entropy is original
