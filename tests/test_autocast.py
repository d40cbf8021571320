"""An enclosing torch.autocast changes nothing: the library decides its own precision, so a call (forward and
backward) under `torch.autocast("cpu", torch.bfloat16)` returns exactly what it returns without autocast, on every
strategy and backend, for fp32 and bf16 inputs.

Before every body ran with autocast off, the chunked strategy's `a @ b` came back in bf16 under autocast and
`d_hidden.index_copy_` raised for fp32 inputs, and the single-chunk dW was made by a bf16 GEMM."""

import pytest
import torch

import oracle
from conftest import leaf_copies, package_run

import grpo_kernels as gk

CASES = [("chunked", "torch"), ("fused", "torch"), ("chunked", "triton"), ("fused", "triton")]


def _loss_run(problem, autocast: bool, **opts):
    ctx = torch.autocast("cpu", torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:  # the backward too: on the CPU it runs on this thread, inside the region
        loss, metrics, grads = package_run(problem, **opts)
    return [loss, *[m for m in metrics if m is not None], *grads.values()]


def _assert_same(got, want, label):
    assert len(got) == len(want), label
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{label} output {i}: {a.dtype} vs {b.dtype}"
        assert torch.equal(a, b), f"{label} output {i} differs under autocast: max |diff| {(a - b).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strategy,backend", CASES, ids=[f"{s}-{b}" for s, b in CASES])
@pytest.mark.parametrize("chunk_size", [4, None], ids=["chunks", "one-chunk"])
def test_loss_under_autocast_equals_loss_without(strategy, backend, dtype, chunk_size):
    p = oracle.make_problem(B=3, T=5, H=24, V=37, seed=21, dtype=dtype, bias=True, ref="given")
    opts = dict(loss_type="dapo", beta=0.04, compute_entropy=True, strategy=strategy, backend=backend,
                chunk_size=chunk_size)
    _assert_same(_loss_run(p, True, **opts), _loss_run(p, False, **opts), f"{strategy}/{backend}/{dtype}")


def test_fp16_deferred_gradients_under_autocast():
    """fp16 inputs make their gradients in the backward (recomputed logits): that body runs without autocast too."""
    p = oracle.make_problem(B=3, T=5, H=24, V=37, seed=22, dtype=torch.float16, bias=True, ref="given")
    opts = dict(loss_type="dapo", beta=0.04, strategy="chunked", backend="torch", chunk_size=4)
    _assert_same(_loss_run(p, True, **opts), _loss_run(p, False, **opts), "fp16")


def _logprobs_run(problem, autocast: bool, **opts):
    args, leaves = leaf_copies({"hidden": problem["hidden"], "weight": problem["weight"], "bias": problem["bias"]})
    ctx = torch.autocast("cpu", torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        logp, ent = gk.linear_logprobs(args["hidden"], args["weight"], problem["selected_token_ids"],
                                       bias=args["bias"], return_entropy=True, temperature=0.8, **opts)
        (logp.sum() + 0.3 * ent.sum()).backward()
    return [logp.detach(), ent.detach(), *[leaves[k].grad for k in leaves]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("strategy,backend", CASES, ids=[f"{s}-{b}" for s, b in CASES])
def test_linear_logprobs_under_autocast_equals_without(strategy, backend, dtype):
    p = oracle.make_problem(B=2, T=6, H=24, V=37, seed=23, dtype=dtype, bias=True)
    opts = dict(strategy=strategy, backend=backend, chunk_size=5)
    _assert_same(_logprobs_run(p, True, **opts), _logprobs_run(p, False, **opts), f"{strategy}/{backend}/{dtype}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grpo_loss_under_autocast_equals_without(backend):
    g = torch.Generator().manual_seed(24)
    logp = -torch.rand(3, 5, generator=g) * 3
    old = logp + 0.3 * torch.randn(3, 5, generator=g)
    mask = torch.ones(3, 5)
    adv = torch.randn(3, generator=g)
    outs = []
    for autocast in (True, False):
        x = logp.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss, _ = gk.grpo_loss(x, mask, adv, old_per_token_logps=old, backend=backend)
            loss.backward()
        outs.append([loss.detach(), x.grad])
    _assert_same(*outs, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vocab_parallel_under_autocast_equals_without(one_rank_group, dtype):
    p = oracle.make_problem(B=3, T=5, H=24, V=37, seed=25, dtype=dtype, bias=True, ref="given")
    for chunk_size in (4, None):
        opts = dict(loss_type="dapo", beta=0.04, compute_entropy=True, chunk_size=chunk_size,
                    process_group=one_rank_group)
        _assert_same(_loss_run(p, True, **opts), _loss_run(p, False, **opts), f"vocab-parallel/{dtype}")
    lp = dict(chunk_size=5, process_group=one_rank_group)
    _assert_same(_logprobs_run(p, True, **lp), _logprobs_run(p, False, **lp), f"vocab-parallel logprobs/{dtype}")
