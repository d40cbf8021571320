"""The NaN rule: NaN or Inf in any input that reaches a live token makes the loss NaN and reaches the gradients,
on every backend and strategy, exactly where plain autograd of the float64 oracle puts them on live tokens (a
masked token's dH is an exact 0 here, where autograd's 0 * NaN of a sequence-level ratio makes it NaN).

What used to differ: the chunked epilogue kernel skipped a program whose max |g| was not > 0 (NaN: the interpreter
zeroed the whole BLOCK_M = 4 group, the GPU's one-row programs wrote zeros), the fused backward skipped a 128-row
block the same way, and on-policy (no old log-probs) the closed form used ratio = 1, so a NaN hidden state of an
active token gave a finite loss where autograd's exp(logp - logp.detach()) gives NaN."""

import pytest
import torch

import oracle
from conftest import package_run

import grpo_kernels as gk
from grpo_kernels import torch_ops
from grpo_kernels.kernels import chunk_dlogits_, fused_linear_backward

CASES = [("chunked", "torch"), ("fused", "torch"), ("chunked", "triton"), ("fused", "triton")]
B, T, H, V = 3, 6, 24, 37


def _poisoned(source: str, value: float, dtype=torch.float32, **kw):
    """A problem with one non-finite input that reaches the live token (b=1, t=2), and that token's mask on."""
    p = oracle.make_problem(B=B, T=T, H=H, V=V, seed=31, bias=True, dtype=dtype, **kw)
    p["attention_mask"][1, 2] = 1.0
    if source == "hidden":
        p["hidden"] = p["hidden"].clone()
        p["hidden"][1, 2, 5] = value
    elif source == "weight":  # the target's row: every token's logits see it
        p["weight"] = p["weight"].clone()
        p["weight"][int(p["selected_token_ids"][1, 2]), 3] = value
    elif source == "advantages":
        p["advantages"] = p["advantages"].clone()
        p["advantages"][1] = value
    elif source == "old":
        p["old_per_token_logps"] = p["old_per_token_logps"].clone()
        p["old_per_token_logps"][1, 2] = value
    elif source == "ref":
        p["ref_per_token_logps"] = p["ref_per_token_logps"].clone()
        p["ref_per_token_logps"][1, 2] = value
    return p


def _assert_pattern(problem, opts, run):
    e_loss, _, e_grads = oracle.oracle_run(problem, **opts)
    loss, _, grads = package_run(problem, **opts, **run)
    assert not torch.isfinite(e_loss), "the oracle itself gives a finite loss: not a NaN-rule case"
    assert not torch.isfinite(loss), f"loss {float(loss)} is finite; autograd gives {float(e_loss)}"
    live = problem["attention_mask"].reshape(-1) != 0
    for k, want in e_grads.items():
        got = grads[k]
        if k == "hidden":  # masked tokens: autograd multiplies a NaN by their 0 mask (NaN); ours are exact zeros
            got, want = got.reshape(live.numel(), -1), want.reshape(live.numel(), -1)
            assert torch.equal(got[~live].double(), torch.zeros_like(want[~live]))
            got, want = got[live], want[live]
        bad_got, bad_want = ~torch.isfinite(got.double()), ~torch.isfinite(want)
        assert bad_want.any(), k
        assert torch.equal(bad_got, bad_want), (
            f"grad {k}: non-finite at {bad_got.nonzero().flatten().tolist()[:12]}, "
            f"autograd at {bad_want.nonzero().flatten().tolist()[:12]}")


# (source, value, loss options, problem options): the on-policy cases are the closed form's ratio = 1
SOURCES = [
    ("hidden", float("nan"), dict(loss_type="dapo"), dict(old=False, ref=None)),
    ("hidden", float("inf"), dict(loss_type="grpo"), dict(old=False, ref=None)),
    ("hidden", float("nan"), dict(loss_type="grpo", importance_sampling_level="sequence"), dict(ref=None)),
    ("hidden", float("nan"), dict(loss_type="vespo"), dict(old=False, ref=None)),
    ("hidden", float("nan"), dict(loss_type="sapo", beta=0.04), dict(old=False)),
    ("weight", float("nan"), dict(loss_type="dapo"), dict(ref=None)),
    ("advantages", float("nan"), dict(loss_type="cispo"), dict(ref=None)),
    ("old", float("nan"), dict(loss_type="dapo"), dict(ref=None)),
    ("ref", float("inf"), dict(loss_type="bnpo", beta=0.04), dict(old=False)),
]


@pytest.mark.parametrize("strategy,backend", CASES, ids=[f"{s}-{b}" for s, b in CASES])
@pytest.mark.parametrize("source,value,opts,prob", SOURCES,
                         ids=[f"{s}-{v}-{o['loss_type']}{'-seq' if 'importance_sampling_level' in o else ''}"
                              for s, v, o, _ in SOURCES])
@pytest.mark.parametrize("chunk_size", [4, None], ids=["chunks", "one-chunk"])
def test_nonfinite_input_reaches_loss_and_gradients(strategy, backend, source, value, opts, prob, chunk_size):
    p = _poisoned(source, value, **prob)
    _assert_pattern(p, opts, dict(strategy=strategy, backend=backend, chunk_size=chunk_size, compute_entropy=True))


@pytest.mark.parametrize("strategy,backend", CASES, ids=[f"{s}-{b}" for s, b in CASES])
def test_nan_hidden_bf16(strategy, backend):
    p = _poisoned("hidden", float("nan"), dtype=torch.bfloat16, old=False, ref=None)
    _assert_pattern(p, dict(loss_type="dapo"), dict(strategy=strategy, backend=backend, chunk_size=4))


def test_nan_hidden_vocab_parallel(one_rank_group):
    for source, value, opts, prob in SOURCES[:2]:
        p = _poisoned(source, value, **prob)
        _assert_pattern(p, opts, dict(process_group=one_rank_group, chunk_size=4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grpo_loss_from_nan_logprobs(backend):
    """grpo_loss from log-probs on-policy: a NaN log-prob makes the loss and its gradient NaN (autograd's
    exp(logp - logp.detach()) does), the other tokens' gradients stay finite."""
    g = torch.Generator().manual_seed(32)
    logp = -torch.rand(B, T, generator=g) * 3
    logp[1, 2] = float("nan")
    x = logp.clone().requires_grad_(True)
    loss, _ = gk.grpo_loss(x, torch.ones(B, T), torch.randn(B, generator=g), backend=backend, loss_type="dapo")
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isnan(x.grad[1, 2]) and torch.isfinite(x.grad.flatten()[torch.arange(B * T) != 1 * T + 2]).all()


# ------------------------------------------------------------------------- the kernels' live-row gating alone

def _grad_with_lone_nan(m, row):
    g = torch.zeros(m)
    g[row] = float("nan")
    g[m - 1] = 0.5  # one finite live row in another group
    return g


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16], ids=["fp32", "packed-bf16"])
def test_chunk_dlogits_kernel_keeps_a_nan_row_among_zero_rows(out_dtype):
    """Rows 0..3 form one interpreter program (BLOCK_M = 4): row 1 has g = NaN, rows 0, 2, 3 have g = 0. The NaN
    row is NaN across the vocabulary (as torch's epilogue makes it), the zero rows are exact zeros."""
    g = torch.Generator().manual_seed(33)
    m, v = 9, 70
    logits = torch.randn(m, v, generator=g)
    targets = torch.randint(0, v, (m,), generator=g)
    lse = torch.logsumexp(logits, 1)
    grad = _grad_with_lone_nan(m, 1)
    out = chunk_dlogits_(logits.clone(), targets, lse, grad, 1.0, out_dtype=out_dtype).float()
    ref = torch_ops.chunk_dlogits_(logits.clone().double(), targets, lse.double(), grad.double(), 1.0)
    assert torch.isnan(out[1]).all()
    assert torch.equal(out[[0, 2, 3]], torch.zeros(3, v))
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.parametrize("with_entropy_grad", [False, True])
def test_fused_backward_kernel_keeps_a_block_whose_only_live_row_is_nan(with_entropy_grad):
    """The interpreter's 16-row blocks: rows 0..15 hold one NaN g and zeros. The block is computed, so the NaN row
    reaches its d_hidden row and every d_weight row; the rows with g = 0 stay exact zeros."""
    g = torch.Generator().manual_seed(34)
    m, h, v = 20, 16, 40
    hidden, weight = torch.randn(m, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    targets = torch.randint(0, v, (m,), generator=g)
    z = hidden @ weight.T
    lse = torch.logsumexp(z, 1)
    grad = _grad_with_lone_nan(m, 3)
    extra = {}
    if with_entropy_grad:
        p = torch.softmax(z, 1)
        extra = dict(entropy=-(p * torch.log_softmax(z, 1)).sum(1), grad_entropy=torch.zeros(m))
    dh, dw, db = fused_linear_backward(hidden, weight, None, targets, lse, grad, 1.0, True, True, False, **extra)
    assert torch.isnan(dh[3]).all() and torch.isnan(dw).all()
    zero_rows = [i for i in range(16) if i != 3]
    assert torch.equal(dh[zero_rows], torch.zeros(len(zero_rows), h))
