"""linear_logprobs: per-token log-probs and entropy, and the gradients of both, against float64 full logits."""

import pytest
import torch

import grpo_kernels as gk
import oracle
from conftest import rel_err

BACKENDS = [(b, s) for b in ("torch", "triton") for s in ("chunked", "fused")]
F64 = torch.float64


def _inputs(seed, B=3, T=7, H=24, V=37, dtype=torch.float32, bias=True, scale=1.5, hidden_2d=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g)
    W = torch.randn(V, H, generator=g) * scale / H ** 0.5
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    up = torch.randn(B, T, generator=g)  # random upstream gradient on the log-probs
    if hidden_2d:
        h = h.reshape(B * T, H)
    cast = (lambda x: None if x is None else x.to(dtype))
    return cast(h), cast(W), cast(b), y, up


def _up_ent(y, seed=99):
    """A random upstream gradient on the entropy (the entropy bonus / verl's d_entropy), never zero."""
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)) + 0.1


def _objective(logp, ent, up, up_ent):
    out = 0.0
    if up is not None:
        out = out + (logp * up.to(logp.dtype)).sum()
    if up_ent is not None:
        out = out + (ent * up_ent.to(ent.dtype)).sum()
    return out


def _run(h, W, b, y, up, temp, up_ent=None, **kw):
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None for x in (h, W, b)]
    logp, ent = gk.linear_logprobs(leaves[0], leaves[1], y, leaves[2], temperature=temp, return_entropy=True, **kw)
    _objective(logp, ent, up, up_ent).backward()
    return logp, ent, [None if x is None else x.grad for x in leaves]


def _oracle(h, W, b, y, up, temp, logit_dtype=None, up_ent=None):
    leaves = [x.detach().to(F64).requires_grad_(True) if x is not None else None for x in (h, W, b)]
    logp, ent = oracle.logprobs(leaves[0], leaves[1], y, leaves[2], temp, logit_dtype)
    _objective(logp, ent, up, up_ent).backward()
    return logp.detach(), ent.detach(), [None if x is None else x.grad for x in leaves]


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("temp", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("hidden_2d", [False, True])
def test_values_entropy_and_grads(backend, strategy, temp, bias, hidden_2d):
    """Gradients of sum(up * logp + up_ent * entropy) w.r.t. hidden, weight and bias against float64 autograd."""
    h, W, b, y, up = _inputs(int(temp * 10) + 2 * bias + hidden_2d, bias=bias, hidden_2d=hidden_2d)
    up_ent = _up_ent(y)
    logp, ent, grads = _run(h, W, b, y, up, temp, up_ent=up_ent, backend=backend, strategy=strategy)
    e_logp, e_ent, e_grads = _oracle(h, W, b, y, up, temp, up_ent=up_ent)
    assert logp.dtype == torch.float32 and logp.shape == y.shape and ent.shape == y.shape
    assert ent.dtype == torch.float32 and ent.requires_grad
    assert rel_err(logp, e_logp) < 1e-5
    assert rel_err(ent, e_ent) < 1e-5
    for name, g, e in zip(("hidden", "weight", "bias"), grads, e_grads):
        if e is not None:
            assert g is not None and g.shape == e.shape and g.dtype == torch.float32, name
            assert rel_err(g, e) < 1e-4, name


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_flat_targets_and_return_entropy_false(backend, strategy):
    h, W, b, y, up = _inputs(5, hidden_2d=True)
    y1 = y.reshape(-1)
    logp = gk.linear_logprobs(h, W, y1.to(torch.int32), b, backend=backend, strategy=strategy)
    assert isinstance(logp, torch.Tensor) and logp.shape == y1.shape
    e_logp, _, _ = _oracle(h, W, b, y1, up.reshape(-1), 1.0)
    assert rel_err(logp, e_logp) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("chunk_size", [1, 4, 9])
def test_small_chunks(backend, chunk_size):
    h, W, b, y, up = _inputs(6)
    logp, ent, grads = _run(h, W, b, y, up, 0.7, backend=backend, strategy="chunked", chunk_size=chunk_size)
    e_logp, e_ent, e_grads = _oracle(h, W, b, y, up, 0.7)
    assert rel_err(logp, e_logp) < 1e-5 and rel_err(ent, e_ent) < 1e-5
    for g, e in zip(grads, e_grads):
        assert rel_err(g, e) < 1e-4


@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("temp", [1.0, 0.7])
def test_bf16(backend, strategy, temp):
    """bf16 inputs: fp32 outputs within DESIGN's 1e-2, or twice the cost of rounding the logits to bf16 once."""
    h, W, b, y, up = _inputs(7, dtype=torch.bfloat16)
    logp, ent, grads = _run(h, W, b, y, up, temp, backend=backend, strategy=strategy)
    assert logp.dtype == torch.float32
    e_logp, e_ent, e_grads = _oracle(h, W, b, y, up, temp)
    r_logp, r_ent, r_grads = _oracle(h, W, b, y, up, temp, logit_dtype=torch.bfloat16)
    for name, got, exact, rounded in [("logp", logp, e_logp, r_logp), ("entropy", ent, e_ent, r_ent)] + [
            (k, g, e, r) for k, g, e, r in zip(("hidden", "weight", "bias"), grads, e_grads, r_grads)]:
        budget = max(1e-2, 2 * rel_err(rounded, exact))
        assert rel_err(got, exact) < budget, name
    assert all(g.dtype == torch.bfloat16 for g in grads)


@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_large_vocab_torch(strategy):
    h, W, b, y, up = _inputs(8, B=2, T=3, H=16, V=4099)
    logp, ent, grads = _run(h, W, b, y, up, 1.0, backend="torch", strategy=strategy)
    e_logp, e_ent, e_grads = _oracle(h, W, b, y, up, 1.0)
    assert rel_err(logp, e_logp) < 1e-5 and rel_err(ent, e_ent) < 1e-5
    for g, e in zip(grads, e_grads):
        assert rel_err(g, e) < 1e-4


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_large_magnitude_logits(backend, strategy):
    h, W, b, y, up = _inputs(9, scale=1.5e3)
    logp, ent, grads = _run(h, W, b, y, up, 1.0, backend=backend, strategy=strategy)
    e_logp, e_ent, e_grads = _oracle(h, W, b, y, up, 1.0)
    # logits ~1e3 in fp32 carry ~1e-4 absolute rounding; the log-probs (~ -1e3) inherit it
    assert rel_err(logp, e_logp) < 1e-5
    assert (ent - e_ent).abs().max() < 1e-3
    for g, e in zip(grads, e_grads):
        assert rel_err(g, e) < 1e-3


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_frozen_weight_and_bias(backend, strategy):
    h, W, b, y, up = _inputs(10)
    hh = h.clone().requires_grad_(True)
    logp = gk.linear_logprobs(hh, W, y, b, backend=backend, strategy=strategy)
    (logp * up).sum().backward()
    _, _, e_grads = _oracle(h, W, b, y, up, 1.0)
    assert W.grad is None and b.grad is None
    assert rel_err(hh.grad, e_grads[0]) < 1e-4


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_single_token_and_tiny_vocab(backend, strategy):
    h, W, b, y, up = _inputs(11, B=1, T=1, H=17, V=3)
    logp, ent, grads = _run(h, W, b, y, up, 1.3, backend=backend, strategy=strategy)
    e_logp, e_ent, e_grads = _oracle(h, W, b, y, up, 1.3)
    assert rel_err(logp, e_logp) < 1e-5 and rel_err(ent, e_ent) < 1e-5
    for g, e in zip(grads, e_grads):
        assert rel_err(g, e) < 1e-4


# ------------------------------------------------------------------------------------- differentiable entropy
@pytest.mark.parametrize("backend,strategy", BACKENDS)
@pytest.mark.parametrize("temp", [1.0, 0.6])
def test_entropy_gradient_alone(backend, strategy, temp):
    """Only the entropy is differentiated (logp unused): its gradient alone, odd shapes, temperature."""
    h, W, b, y, _ = _inputs(21, B=2, T=5, H=19, V=41)
    up_ent = _up_ent(y, seed=3)
    logp, ent, grads = _run(h, W, b, y, None, temp, up_ent=up_ent, backend=backend, strategy=strategy)
    e_logp, e_ent, e_grads = _oracle(h, W, b, y, None, temp, up_ent=up_ent)
    assert rel_err(ent, e_ent) < 1e-5
    for name, g, e in zip(("hidden", "weight", "bias"), grads, e_grads):
        assert g is not None and rel_err(g, e) < 1e-4, name


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_entropy_gradient_small_chunks_and_frozen_weight(backend, strategy):
    """Several chunks (chunked) and a frozen weight: d_hidden and d_bias of logp + entropy."""
    h, W, b, y, up = _inputs(22, B=2, T=9, H=13, V=29)
    up_ent = _up_ent(y, seed=4)
    hh, bb = h.clone().requires_grad_(True), b.clone().requires_grad_(True)
    logp, ent = gk.linear_logprobs(hh, W, y, bb, temperature=0.8, return_entropy=True, backend=backend,
                                   strategy=strategy, chunk_size=5)
    _objective(logp, ent, up, up_ent).backward()
    _, _, e_grads = _oracle(h, W, b, y, up, 0.8, up_ent=up_ent)
    assert W.grad is None
    assert rel_err(hh.grad, e_grads[0]) < 1e-4 and rel_err(bb.grad, e_grads[2]) < 1e-4


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_entropy_gradient_large_magnitude_logits(backend, strategy):
    """|z| ~ 1e3: the entropy gradient -p (log p + H) must not cancel or overflow."""
    h, W, b, y, up = _inputs(23, scale=1.5e3)
    up_ent = _up_ent(y, seed=5)
    logp, ent, grads = _run(h, W, b, y, up, 1.0, up_ent=up_ent, backend=backend, strategy=strategy)
    e_logp, e_ent, e_grads = _oracle(h, W, b, y, up, 1.0, up_ent=up_ent)
    assert (ent - e_ent).abs().max() < 1e-3
    for g, e in zip(grads, e_grads):
        assert rel_err(g, e) < 1e-3


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_entropy_gradient_bf16(backend, strategy):
    """bf16 inputs: logp + entropy gradients within DESIGN's 1e-2 (or twice the cost of bf16 logits)."""
    h, W, b, y, up = _inputs(24, dtype=torch.bfloat16)
    up_ent = _up_ent(y, seed=6)
    logp, ent, grads = _run(h, W, b, y, up, 0.7, up_ent=up_ent, backend=backend, strategy=strategy)
    e_logp, e_ent, e_grads = _oracle(h, W, b, y, up, 0.7, up_ent=up_ent)
    r_logp, r_ent, r_grads = _oracle(h, W, b, y, up, 0.7, logit_dtype=torch.bfloat16, up_ent=up_ent)
    for name, g, e, r in zip(("hidden", "weight", "bias"), grads, e_grads, r_grads):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, e) < max(1e-2, 2 * rel_err(r, e)), name


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_unused_entropy_gradient_is_not_computed(backend, strategy, monkeypatch):
    """return_entropy=True but only logp is differentiated: the backward gets no entropy gradient (no extra
    work), and the result equals the logp-only gradient."""
    from grpo_kernels.backends import get_ops
    ops = get_ops(backend)
    name = "fused_linear_backward" if strategy == "fused" else "chunk_dlogits_"
    real, seen = getattr(ops, name), []

    def spy(*a, **k):
        seen.append(k.get("grad_entropy"))
        return real(*a, **k)

    monkeypatch.setattr(ops, name, spy)
    h, W, b, y, up = _inputs(25)
    _, _, grads = _run(h, W, b, y, up, 1.0, backend=backend, strategy=strategy)
    assert seen and all(x is None for x in seen)
    _, _, e_grads = _oracle(h, W, b, y, up, 1.0)
    for g, e in zip(grads, e_grads):
        assert rel_err(g, e) < 1e-4


@pytest.mark.parametrize("backend,strategy", BACKENDS)
def test_chunked_and_fused_agree_to_fp32_with_bf16_inputs(backend, strategy):
    """Precision contract: bf16 inputs, fp32 logits on every path. Log-probs and entropy agree with float64 on
    the same bf16 values to fp32 precision (not bf16's 1e-2): no path rounds the logits to 16 bits."""
    h, W, b, y, up = _inputs(26, B=2, T=11, H=32, V=203, dtype=torch.bfloat16, scale=6.0)
    with torch.no_grad():
        logp, ent = gk.linear_logprobs(h, W, y, b, return_entropy=True, backend=backend, strategy=strategy,
                                       chunk_size=7)
    e_logp, e_ent = oracle.logprobs(h.double(), W.double(), y, b.double())
    assert (logp.double() - e_logp).abs().max() < 1e-4
    assert rel_err(ent, e_ent) < 1e-5


def test_fp16_gradients():
    """fp16 inputs on both strategies (torch backend): values and gradients of logp + entropy."""
    h, W, b, y, up = _inputs(27, dtype=torch.float16)
    up_ent = _up_ent(y, seed=7)
    e_logp, e_ent, e_grads = _oracle(h, W, b, y, up, 0.9, up_ent=up_ent)
    for strategy in ("chunked", "fused"):
        logp, ent, grads = _run(h, W, b, y, up, 0.9, up_ent=up_ent, backend="torch", strategy=strategy)
        assert rel_err(logp, e_logp) < 1e-5 and rel_err(ent, e_ent) < 1e-5
        for name, g, e in zip(("hidden", "weight", "bias"), grads, e_grads):
            assert g.dtype == torch.float16 and rel_err(g, e) < 1e-2, (strategy, name)
