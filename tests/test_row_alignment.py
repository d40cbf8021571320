"""Row alignment of the chunk buffer: the fp32 [rows, V] logits buffer has row stride round_up(V, 16) and the
packed 16-bit dL/dlogits over it row stride 2 * round_up(V, 16), so every row starts on a 64-byte boundary even
when V % 4 != 0 (GPT-2's 50257, 32001, 1001); the kernels and GEMMs read the view [:, :V] through its strides.
Before, the row stride was V and every row but the first was misaligned (cuBLAS loses its aligned kernels,
Triton's loads go scalar)."""

import pytest
import torch

import oracle
from conftest import TOL, compare_bf16_run, compare_run

from grpo_kernels import chunk_driver, torch_ops
from grpo_kernels.kernels import chunk_dlogits_ as triton_dlogits

V = 1001


def test_row_stride_rounds_up_to_16():
    assert [torch_ops.row_stride(v) for v in (1, 16, 17, 1001, 32001, 50257, 128256)] == \
        [16, 16, 32, 1008, 32016, 50272, 128256]


def test_linear_fp32_rows_are_aligned():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(5, 8, generator=g), torch.randn(V, 8, generator=g)
    z = torch_ops.linear_fp32(h, w, None)
    assert z.shape == (5, V) and z.stride() == (1008, 1)
    assert all((z[i].data_ptr() % 64) == 0 for i in range(5))
    assert torch.allclose(z.double(), h.double() @ w.double().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ops", ["torch", "triton"])
def test_packed_view_keeps_the_aligned_stride(ops):
    g = torch.Generator().manual_seed(2)
    m = 6
    buf = torch_ops.empty_rows(m, V, torch.float32, "cpu")
    buf.copy_(torch.randn(m, V, generator=g))
    targets = torch.randint(0, V, (m,), generator=g)
    lse = torch.logsumexp(buf, 1)
    grad = torch.randn(m, generator=g)
    ref = torch_ops.chunk_dlogits_(buf.clone().double(), targets, lse.double(), grad.double(), 1.0)
    fn = torch_ops.chunk_dlogits_ if ops == "torch" else triton_dlogits
    out = fn(buf, targets, lse, grad, 1.0, out_dtype=torch.bfloat16)
    assert out.stride() == (2 * 1008, 1) and out.data_ptr() == buf.data_ptr()
    assert all((out[i].data_ptr() % 64) == 0 for i in range(m))
    # one bf16 rounding per entry (2**-7: the interpreter's 16-bit store is off by up to one ulp, any layout)
    assert torch.allclose(out.double(), ref, rtol=2.0**-7, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_odd_vocab_loss_matches_float64_with_aligned_buffers(dtype, backend, monkeypatch):
    strides = []
    real = chunk_driver.chunk_logits
    monkeypatch.setattr(chunk_driver, "chunk_logits",
                        lambda h, w, b: strides.append(real(h, w, b).stride()) or real(h, w, b))
    p = oracle.make_problem(B=2, T=5, H=16, V=V, seed=3, dtype=dtype, bias=True, ref="given")
    opts = dict(loss_type="dapo", beta=0.04)
    run = dict(strategy="chunked", backend=backend, chunk_size=4, compute_entropy=True)
    if dtype == torch.float32:
        fails = compare_run(p, opts, run, oracle.oracle_run(p, **opts), tol=TOL[dtype], metric_tol=1e-5)
    else:
        fails = compare_bf16_run(p, opts, run)
    assert not fails, "\n".join(fails)
    assert strides and all(s == (1008, 1) for s in strides), strides
