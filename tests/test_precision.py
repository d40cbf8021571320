"""The precision pieces of torch_ops: fp32-output GEMMs from 16-bit operands (CPU fallback), the in-row 16-bit
packing of dL/dlogits, and the fp32 logits of every strategy against float64 (Issue 7 §2)."""

import pytest
import torch

from grpo_kernels import torch_ops
from conftest import rel_err

F64 = torch.float64


def _mats(m, k, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("tile", [None, 7])  # 7: the fallback's reduction slices are tiny, many of them
def test_gemm_into_fp32_output_and_accumulation(dtype, tile, monkeypatch):
    if tile is not None:
        monkeypatch.setattr(torch_ops, "TILE_ELEMENTS", tile)
    a, b = _mats(9, 23, 13, dtype, 1)
    exact = a.to(F64) @ b.to(F64)
    out = torch.empty(9, 13)
    assert torch_ops.gemm_into(out, a, b) is out
    assert (out.double() - exact).abs().max() < 1e-4  # exact products of 16-bit values, fp32 sums
    start = torch.randn(9, 13)
    acc = start.clone()
    ptr = acc.data_ptr()
    torch_ops.gemm_into(acc, a, b, accumulate=True)
    assert acc.data_ptr() == ptr and rel_err(acc, start.double() + exact) < 1e-6


def test_gemm_into_reads_strided_operands():
    """The backward GEMMs read dL/dlogits as a row-strided matrix (row stride 2V) and as its transpose."""
    g = torch.Generator().manual_seed(2)
    wide = torch.randn(6, 80, generator=g).to(torch.bfloat16)
    dl = wide[:, :40]  # [6, 40], row stride 80
    h = torch.randn(6, 11, generator=g).to(torch.bfloat16)
    w = torch.randn(40, 11, generator=g).to(torch.bfloat16)
    start = torch.randn(40, 11, generator=g)
    acc = start.clone()
    torch_ops.gemm_into(acc, dl.T, h, accumulate=True)  # dW += dl^T h
    assert rel_err(acc, start.double() + dl.double().T @ h.double()) < 1e-6
    dh = torch_ops.gemm_into(torch.empty(6, 11), dl, w)  # dh = dl W
    assert rel_err(dh, dl.double() @ w.double()) < 1e-6


def test_linear_fp32_is_not_rounded_to_bf16():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(300, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(300, generator=g).to(torch.bfloat16)
    z = torch_ops.linear_fp32(h, w, b)
    exact = h.double() @ w.double().T + b.double()
    assert z.dtype == torch.float32
    assert (z.double() - exact).abs().max() < 1e-4 * exact.abs().max()
    # a bf16 GEMM output would be off by ~ 2**-8 relative
    assert (z.double() - exact).abs().max() < 0.05 * (exact.to(torch.bfloat16).double() - exact).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,v", [(3, 1000), (4, 257), (2, 5), (1, 700)])
def test_pack_rows_in_place(dtype, m, v):
    """Row values rounded once into the first half of the row's own storage; blocks that at most double."""
    big = torch.randn(m, v + 9)
    buf = big[:, :v]
    expected = buf.to(dtype)
    out = torch_ops.pack_rows_(buf, dtype)
    assert out.dtype == dtype and out.shape == (m, v) and out.stride() == (2 * (v + 9), 1)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.equal(out, expected)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_torch_chunk_dlogits_packed_equals_fp32_rounded(out_dtype, monkeypatch):
    # Both through the PyTorch epilogue: the native CPU one (fp32 in place only) rounds differently in the last ulp.
    monkeypatch.setenv("GRPO_KERNELS_NATIVE", "0")
    g = torch.Generator().manual_seed(4)
    m, v = 6, 1100
    logits = torch.randn(m, v, generator=g) * 3
    targets = torch.randint(0, v, (m,), generator=g)
    grad = torch.randn(m, generator=g)
    g_ent = torch.randn(m, generator=g)
    lse, _, ent = torch_ops.chunk_stats(logits, targets, 0.8, True)
    fp32 = torch_ops.chunk_dlogits_(logits.clone(), targets, lse, grad, 0.8, entropy=ent, grad_entropy=g_ent)
    packed = torch_ops.chunk_dlogits_(logits.clone(), targets, lse, grad, 0.8, entropy=ent, grad_entropy=g_ent,
                                      out_dtype=out_dtype)
    assert packed.dtype == out_dtype and packed.stride() == (2 * v, 1)
    assert torch.equal(packed, fp32.to(out_dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_16bit_on_cpu_rounds_once(dtype):
    """16-bit operands on the CPU: fp32 products and sums, then one rounding to the operands' dtype."""
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(7, 90, generator=g).to(dtype)
    a = wide[:, :45]  # row-strided, as the packed dL/dlogits
    b = torch.randn(45, 19, generator=g).to(dtype)
    out = torch_ops.matmul(a, b)
    assert out.dtype == dtype and out.shape == (7, 19)
    assert torch.equal(out, (a.double() @ b.double()).float().to(dtype))
