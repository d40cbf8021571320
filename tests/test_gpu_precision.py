"""CUDA checks of the precision work (skipped without a GPU; written without one, never run yet): cuBLAS fp32-output
GEMMs from 16-bit operands, the packed 16-bit dL/dlogits written over its own fp32 rows by many warps, the
differentiable entropy and fp32 agreement of the strategies with bf16 inputs."""

import pytest
import torch

import oracle
from conftest import rel_err

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_into_on_cuda(dtype):
    from grpo_kernels import torch_ops

    g = torch.Generator().manual_seed(1)
    a = torch.randn(300, 512, generator=g).to(dtype).to(DEV)
    b = torch.randn(512, 1001, generator=g).to(dtype).to(DEV)
    exact = a.double() @ b.double()
    out = torch.empty(300, 1001, device=DEV)
    torch_ops.gemm_into(out, a, b)
    assert rel_err(out, exact) < 1e-5  # fp32 output: no 16-bit rounding (that would be ~1e-3)
    acc = torch.randn(300, 1001, generator=g).to(DEV)
    start, ptr = acc.clone(), acc.data_ptr()
    torch_ops.gemm_into(acc, a, b, accumulate=True)
    assert acc.data_ptr() == ptr and rel_err(acc, start.double() + exact) < 1e-5
    print("fp32-output GEMMs:", torch_ops.fp32_gemm("cuda", dtype))



@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_packed_dlogits_many_tiles_on_cuda(out_dtype):
    """V = 128256: 32 column tiles of 4096 per row, 8 warps each; later tiles land on columns other warps read.
    Equal to the fp32 result rounded to nearest (a race would leave garbage)."""
    from grpo_kernels.kernels import chunk_dlogits_, chunk_stats

    g = torch.Generator().manual_seed(2)
    m, v = 64, 128256
    logits = (torch.randn(m, v, generator=g) * 3).to(DEV)
    targets = torch.randint(0, v, (m,), generator=g).to(DEV)
    grad = torch.randn(m, generator=g).to(DEV)
    g_ent = torch.randn(m, generator=g).to(DEV)
    lse, _, ent = chunk_stats(logits, targets, 0.9, True)
    fp32 = chunk_dlogits_(logits.clone(), targets, lse, grad, 0.9, entropy=ent, grad_entropy=g_ent)
    for _ in range(3):
        packed = chunk_dlogits_(logits.clone(), targets, lse, grad, 0.9, entropy=ent, grad_entropy=g_ent,
                                out_dtype=out_dtype)
        assert packed.stride() == (2 * v, 1)
        assert torch.equal(packed, fp32.to(out_dtype))


@pytest.mark.parametrize("strategy", ["chunked", "fused"])
def test_linear_logprobs_bf16_fp32_logits_and_entropy_grad_on_cuda(strategy):
    import grpo_kernels as gk

    g = torch.Generator().manual_seed(3)
    N, H, V = 700, 256, 32003
    h = torch.randn(N, H, generator=g).to(torch.bfloat16)
    w = (torch.randn(V, H, generator=g) * (3.0 / H ** 0.5)).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), generator=g)
    up, up_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    hh, ww = h.clone().to(DEV).requires_grad_(True), w.clone().to(DEV).requires_grad_(True)
    logp, ent = gk.linear_logprobs(hh, ww, y.to(DEV), temperature=0.8, return_entropy=True, strategy=strategy,
                                   chunk_size=256)
    ((logp * up.to(DEV)).sum() + (ent * up_ent.to(DEV)).sum()).backward()
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    e_logp, e_ent = oracle.logprobs(h64, w64, y, temperature=0.8)
    ((e_logp * up.double()).sum() + (e_ent * up_ent.double()).sum()).backward()
    assert (logp.double().cpu() - e_logp.detach()).abs().max() < 1e-4  # fp32 logits (bf16 ones: ~1e-2)
    assert rel_err(ent, e_ent.detach()) < 1e-5
    assert rel_err(hh.grad, h64.grad) < 1e-2 and rel_err(ww.grad, w64.grad) < 1e-2


def test_fp16_grad_scaler_on_cuda():
    import grpo_kernels as gk

    p = oracle.make_problem(B=4, T=64, H=128, V=5003, seed=4, dtype=torch.float16, bias=True, ref="given")
    p["num_items_in_batch"] = 200000
    opts = dict(loss_type="dapo", beta=0.05)
    _, _, e_grads = oracle.oracle_run(p, **opts)
    for strategy in ("chunked", "fused"):
        leaves = {k: p[k].detach().clone().to(DEV).requires_grad_(True) for k in ("hidden", "weight", "bias")}
        args = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
        args.update(leaves)
        loss, _ = gk.fused_linear_grpo_loss(**args, strategy=strategy, chunk_size=64, **opts)
        (loss * 2.0 ** 16).backward()
        for k, e in e_grads.items():
            assert rel_err(leaves[k].grad, e * 2.0 ** 16) < 1e-2, (strategy, k)
