"""The Triton kernels against float64 torch (full logits). Without CUDA they run under TRITON_INTERPRET=1 on CPU
tensors, so every shape here is tiny; sizes are odd on purpose (no multiple of any block)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from grpo_kernels.kernels import chunk_dlogits_, chunk_stats, fused_linear_backward, fused_linear_stats  # noqa: E402
from grpo_kernels.kernels import fused_forward  # noqa: E402
from grpo_kernels.kernels._common import IS_INTERPRETER  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def rel_err(out, ref):
    assert out is not None
    assert torch.isfinite(out).all(), "non-finite values in kernel output"
    ref = ref.double().cpu()
    denom = ref.norm()
    assert denom > 0
    return ((out.double().cpu() - ref).norm() / denom).item()


def assert_close(out, ref, dtype, name=""):
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{name}: relative error {err:.3e} > {TOL[dtype]:.0e}"


def ref_stats(logits64, targets, temperature):
    z = logits64 / temperature
    lse = torch.logsumexp(z, dim=1)
    logp = z.gather(1, targets.long()[:, None]).squeeze(1) - lse
    p = torch.softmax(z, dim=1)
    return lse, logp, lse - (p * z).sum(1)


def ref_dz(logits64, targets, grad, temperature):
    """dL/d(raw logits) in float64."""
    p = torch.softmax(logits64 / temperature, dim=1)
    onehot = torch.nn.functional.one_hot(targets.long(), logits64.shape[1]).double()
    return grad.double()[:, None] * (onehot - p) / temperature


def make_linear(m, v, h, dtype, bias, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hid = (torch.randn(m, h, generator=gen) * scale).to(dtype).to(DEVICE)
    w = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).to(DEVICE)
    b = (torch.randn(v, generator=gen) * 0.5).to(dtype).to(DEVICE) if bias else None
    t = torch.randint(0, v, (m,), generator=gen).to(DEVICE)
    return hid, w, b, t


def linear_logits64(hid, w, b):
    out = hid.double() @ w.double().T
    return out + b.double() if b is not None else out


def make_grad(m, seed=1):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(m, generator=gen)
    g[::3] = 0.0  # rows that must contribute nothing
    return g.to(DEVICE)


# ----------------------------------------------------------------------------------------------- chunk_stats
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("m,v", [(7, 37), (33, 300)])
def test_chunk_stats_matches_float64(dtype, temperature, m, v):
    gen = torch.Generator().manual_seed(m * v)
    logits = (torch.randn(m, v, generator=gen) * 3).to(dtype).to(DEVICE)
    targets = torch.randint(0, v, (m,), generator=gen).to(DEVICE)
    lse, logp, ent = chunk_stats(logits, targets, temperature, True)
    assert lse.dtype == logp.dtype == ent.dtype == torch.float32
    assert lse.shape == logp.shape == ent.shape == (m,)
    r_lse, r_logp, r_ent = ref_stats(logits.double(), targets, temperature)
    assert_close(lse, r_lse, dtype, "lse")
    assert_close(logp, r_logp, dtype, "logp")
    assert_close(ent, r_ent, dtype, "entropy")


def test_chunk_stats_without_entropy_and_int32_targets():
    logits = torch.randn(9, 70).to(DEVICE)
    targets = torch.randint(0, 70, (9,))
    lse, logp, ent = chunk_stats(logits, targets.to(torch.int32).to(DEVICE), 1.0, False)
    assert ent is None
    r_lse, r_logp, _ = ref_stats(logits.double(), targets, 1.0)
    assert_close(lse, r_lse, torch.float32)
    assert_close(logp, r_logp, torch.float32)


def test_chunk_stats_large_magnitude_logits():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 130, generator=gen) * 1e4).to(DEVICE)
    targets = logits.argmax(1)  # logp ~ 0 for some rows: absolute error matters there
    targets[::2] = torch.randint(0, 130, (3,), generator=gen).to(DEVICE)
    lse, logp, ent = chunk_stats(logits, targets, 0.7, True)
    r_lse, r_logp, r_ent = ref_stats(logits.double(), targets, 0.7)
    assert_close(lse, r_lse, torch.float32, "lse")
    assert_close(logp, r_logp, torch.float32, "logp")
    # entropy is ~0 here: compare absolutely (no cancellation of lse - E[z] at |z| ~ 1e4)
    assert torch.isfinite(ent).all() and (ent.double().cpu() - r_ent).abs().max() < 1e-3


def test_chunk_stats_uses_the_target_and_flags_bad_targets():
    logits = torch.randn(6, 41).to(DEVICE)
    targets = torch.randint(0, 41, (6,)).to(DEVICE)
    _, logp, _ = chunk_stats(logits, targets, 1.0, False)
    _, logp_shifted, _ = chunk_stats(logits, (targets + 1) % 41, 1.0, False)
    assert (logp != logp_shifted).all()
    bad = targets.clone()
    bad[2], bad[4] = 41, -1
    _, logp_bad, _ = chunk_stats(logits, bad, 1.0, False)
    assert torch.isnan(logp_bad[[2, 4]]).all() and torch.equal(logp_bad[[0, 1, 3, 5]], logp[[0, 1, 3, 5]])


def test_chunk_stats_row_strided_view():
    big = torch.randn(11, 100).to(DEVICE)
    logits = big[1:8, :45]  # unit column stride, row stride 100: used without a copy
    targets = torch.randint(0, 45, (7,)).to(DEVICE)
    lse, logp, _ = chunk_stats(logits, targets, 1.0, False)
    r_lse, r_logp, _ = ref_stats(logits.double(), targets, 1.0)
    assert_close(lse, r_lse, torch.float32)
    assert_close(logp, r_logp, torch.float32)
    lse_t, logp_t, _ = chunk_stats(logits.t().contiguous().t(), targets, 1.0, False)  # column-major copy
    assert_close(lse_t, r_lse, torch.float32)


def test_chunk_stats_empty_rows():
    lse, logp, ent = chunk_stats(torch.randn(0, 50).to(DEVICE), torch.zeros(0, dtype=torch.long).to(DEVICE), 1.0, True)
    assert lse.shape == logp.shape == ent.shape == (0,) and lse.dtype == torch.float32


def test_chunk_stats_argument_errors():
    logits = torch.randn(4, 10).to(DEVICE)
    t = torch.zeros(4, dtype=torch.long).to(DEVICE)
    with pytest.raises(ValueError, match="logits"):
        chunk_stats(logits[0], t, 1.0, False)
    with pytest.raises(ValueError, match="logits"):
        chunk_stats(logits.double(), t, 1.0, False)
    with pytest.raises(ValueError, match="targets"):
        chunk_stats(logits, t.float(), 1.0, False)
    with pytest.raises(ValueError, match="targets"):
        chunk_stats(logits, t[:3], 1.0, False)
    with pytest.raises(ValueError, match="temperature"):
        chunk_stats(logits, t, 0.0, False)


# --------------------------------------------------------------------------------------------- chunk_dlogits_
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunk_dlogits_in_place(dtype, temperature):
    """No out_dtype: the result overwrites the buffer in its own dtype and the buffer is returned."""
    m, v = 13, 150
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(m, v, generator=gen) * 2).to(dtype).to(DEVICE)
    targets = torch.randint(0, v, (m,), generator=gen).to(DEVICE)
    grad = make_grad(m)
    ref = ref_dz(logits.double(), targets, grad, temperature)
    lse, _, _ = chunk_stats(logits, targets, temperature, False)
    buf = logits.clone()
    ptr = buf.data_ptr()
    out = chunk_dlogits_(buf, targets, lse, grad, temperature)
    assert out is buf and buf.data_ptr() == ptr and buf.dtype == dtype and buf.shape == (m, v)
    assert_close(buf, ref, dtype, "dlogits")
    zero_rows = grad == 0
    assert (buf[zero_rows] == 0).all()
    assert (buf[~zero_rows] != 0).any(dim=1).all()


def ref_dz_entropy(logits64, targets, grad, grad_ent, temperature):
    """dL/d(raw logits) of sum(g * logp + e * entropy) by float64 autograd (not the closed form under test)."""
    z = logits64.detach().clone().requires_grad_(True)
    logsm = torch.log_softmax(z / temperature, dim=1)
    logp = logsm.gather(1, targets.long()[:, None]).squeeze(1)
    ent = -(logsm.exp() * logsm).sum(1)
    ((logp * grad.double()).sum() + (ent * grad_ent.double()).sum()).backward()
    return z.grad


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("m,v", [(13, 150), (5, 37), (3, 2)])
def test_chunk_dlogits_packed_16bit_over_fp32_rows(out_dtype, temperature, m, v):
    """fp32 buffer, 16-bit out_dtype: the result is written over the first half of each row's own storage (several
    column tiles, so later tiles land on columns already read) and returned as a row-strided view; it equals the
    fp32 result rounded once."""
    gen = torch.Generator().manual_seed(m * v)
    logits = (torch.randn(m, v, generator=gen) * 3).to(DEVICE)
    targets = torch.randint(0, v, (m,), generator=gen).to(DEVICE)
    grad = make_grad(m)
    lse, _, _ = chunk_stats(logits, targets, temperature, False)
    expected = chunk_dlogits_(logits.clone(), targets, lse, grad, temperature)  # fp32 result
    buf = logits.clone()
    out = chunk_dlogits_(buf, targets, lse, grad, temperature, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (m, v) and out.stride() == (2 * v, 1)
    assert out.data_ptr() == buf.data_ptr()
    if IS_INTERPRETER and out_dtype == torch.bfloat16:
        # known interpreter quirk: its fp32 -> bf16 cast truncates (the GPU rounds to nearest even)
        rounded = (expected.view(torch.int32) & -65536).view(torch.float32)
    else:
        rounded = expected.to(out_dtype).float()
    assert torch.equal(out.float(), rounded)
    assert_close(out, ref_dz(logits.double(), targets, grad, temperature), out_dtype, "packed dlogits")


def test_chunk_dlogits_packed_row_strided_view():
    big = torch.randn(10, 300).to(DEVICE)
    view = big[2:9, :250]  # rows longer than V: the packed rows keep the view's row pitch
    targets = torch.randint(0, 250, (7,)).to(DEVICE)
    grad = torch.randn(7).to(DEVICE)
    ref = ref_dz(view.double(), targets, grad, 1.0)
    lse, _, _ = chunk_stats(view, targets, 1.0, False)
    untouched = big[:, 250:].clone()
    out = chunk_dlogits_(view, targets, lse, grad, 1.0, out_dtype=torch.bfloat16)
    assert out.stride() == (600, 1)
    assert_close(out, ref, torch.bfloat16, "packed dlogits")
    assert torch.equal(big[:, 250:], untouched)
    with pytest.raises(ValueError, match="out_dtype"):
        chunk_dlogits_(view.to(torch.bfloat16), targets, lse, grad, 1.0, out_dtype=torch.float16)


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_chunk_dlogits_with_entropy_gradient(out_dtype, temperature):
    """g (onehot - p) - e p (log p + H), divided by T, against float64 autograd through log_softmax."""
    m, v = 11, 140
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(m, v, generator=gen) * 2).to(DEVICE)
    targets = torch.randint(0, v, (m,), generator=gen).to(DEVICE)
    grad = make_grad(m)
    g_ent = torch.randn(m, generator=gen).to(DEVICE)
    g_ent[1::4] = 0.0
    g_ent[0] = 0.0  # row 0: both zero (make_grad zeroes rows 0, 3, 6, 9)
    lse, _, ent = chunk_stats(logits, targets, temperature, True)
    out = chunk_dlogits_(logits.clone(), targets, lse, grad, temperature, entropy=ent, grad_entropy=g_ent,
                         out_dtype=out_dtype)
    ref = ref_dz_entropy(logits.double().cpu(), targets.cpu(), grad.cpu(), g_ent.cpu(), temperature)
    assert_close(out, ref, out_dtype or torch.float32, "dlogits with entropy")
    assert (out[0] == 0).all()
    assert (out[3] != 0).any()  # grad 0 but an entropy gradient: a live row
    with pytest.raises(ValueError, match="entropy"):
        chunk_dlogits_(logits.clone(), targets, lse, grad, 1.0, grad_entropy=g_ent)


def test_chunk_dlogits_zero_grad_rows_ignore_lse():
    m, v = 8, 70
    logits = torch.randn(m, v).to(DEVICE)
    targets = torch.randint(0, v, (m,)).to(DEVICE)
    lse, _, _ = chunk_stats(logits, targets, 1.0, False)
    grad = torch.zeros(m).to(DEVICE)
    grad[5] = 1.5
    lse_garbage = lse.clone()
    lse_garbage[grad == 0] = float("nan")  # never looked at for rows with grad 0
    buf = logits.clone()
    chunk_dlogits_(buf, targets, lse_garbage, grad, 1.0)
    assert (buf[grad == 0] == 0).all()
    assert_close(buf, ref_dz(logits.double(), targets, grad, 1.0), torch.float32)


def test_chunk_dlogits_strided_buffer_and_errors():
    big = torch.randn(10, 64).to(DEVICE)
    view = big[2:9, :50]
    targets = torch.randint(0, 50, (7,)).to(DEVICE)
    grad = torch.randn(7).to(DEVICE)
    ref = ref_dz(view.double(), targets, grad, 1.0)
    lse, _, _ = chunk_stats(view, targets, 1.0, False)
    untouched = big[:, 50:].clone()
    chunk_dlogits_(view, targets, lse, grad, 1.0)
    assert_close(big[2:9, :50], ref, torch.float32)
    assert torch.equal(big[:, 50:], untouched)
    with pytest.raises(ValueError, match="logits"):
        chunk_dlogits_(big.t(), torch.zeros(64, dtype=torch.long).to(DEVICE), torch.zeros(64).to(DEVICE),
                       torch.zeros(64).to(DEVICE), 1.0)
    with pytest.raises(ValueError, match="grad"):
        chunk_dlogits_(view, targets, lse, grad[:3], 1.0)
    with pytest.raises(ValueError, match="lse"):
        chunk_dlogits_(view, targets, lse[:, None], grad, 1.0)
    assert chunk_dlogits_(big[:0], targets[:0], lse[:0], grad[:0], 1.0).shape == (0, 64)  # M == 0: nothing to do


# ----------------------------------------------------------------------------------------- fused_linear_stats
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("m,v,h", [(7, 300, 40), (50, 129, 24)])
def test_fused_linear_stats_matches_float64(dtype, bias, temperature, m, v, h):
    hid, w, b, t = make_linear(m, v, h, dtype, bias, scale=2.0)
    lse, logp, ent = fused_linear_stats(hid, w, b, t, temperature, True)
    assert lse.dtype == logp.dtype == ent.dtype == torch.float32 and lse.shape == (m,)
    r_lse, r_logp, r_ent = ref_stats(linear_logits64(hid, w, b), t, temperature)
    assert_close(lse, r_lse, dtype, "lse")
    assert_close(logp, r_logp, dtype, "logp")
    assert_close(ent, r_ent, dtype, "entropy")


def test_fused_linear_stats_covers_single_and_split_vocab():
    # The shapes above take both paths of the vocabulary split (and hence of _combine_kernel) under the interpreter.
    if not IS_INTERPRETER:
        pytest.skip("split choice depends on the GPU's SM count")
    cfg = fused_forward._config(torch.device("cpu"), torch.float32)
    splits = lambda m, v: fused_forward._pick_splits(-(-m // cfg["BLOCK_M"]), -(-v // cfg["BLOCK_V"]), 1,
                                                     cfg["GROUP_M"])[0]
    assert splits(7, 300) > 1 and splits(50, 129) == 1
    # several row-block groups, the last one partial, times several splits: the grouped program order
    assert -(-40 // cfg["BLOCK_M"]) % cfg["GROUP_M"] != 0 and -(-40 // cfg["BLOCK_M"]) > cfg["GROUP_M"]
    assert splits(40, 300) > 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_stats_grouped_order_partial_group(dtype):
    # 3 row blocks in groups of 2 (interpreter config) times 2 vocabulary splits: every (row block, split) once
    hid, w, b, t = make_linear(40, 300, 24, dtype, True, scale=2.0, seed=3)
    lse, logp, ent = fused_linear_stats(hid, w, b, t, 0.8, True)
    r_lse, r_logp, r_ent = ref_stats(linear_logits64(hid, w, b), t, 0.8)
    assert_close(lse, r_lse, dtype, "lse")
    assert_close(logp, r_logp, dtype, "logp")
    assert_close(ent, r_ent, dtype, "entropy")


def test_pick_splits_fills_the_gpu_with_groups():
    # llama3-8b head (V = 128256) on 132 SMs with 128x128 tiles: at N = 65536 the old rule gave 2 splits (the
    # concurrent programs were all different row blocks); now a group of GROUP_M = 8 row blocks spans >= 17 splits
    cfg = dict(BLOCK_M=128, BLOCK_V=128, GROUP_M=8)
    for n in (8192, 65536):
        n_splits, per = fused_forward._pick_splits(-(-n // 128), -(-128256 // 128), 132, cfg["GROUP_M"])
        assert n_splits * cfg["GROUP_M"] >= 132 and (n_splits - 1) * per < 1002 <= n_splits * per
    assert fused_forward._pick_splits(1, 1002, 132, 8)[0] >= 2 * 132  # one row block: still several waves
    assert fused_forward._pick_splits(3, 2, 132, 8) == (2, 1)  # never more splits than tiles


def test_fused_linear_stats_fp16_no_entropy():
    hid, w, b, t = make_linear(20, 77, 33, torch.float16, True)
    lse, logp, ent = fused_linear_stats(hid, w, b, t, 1.0, False)
    assert ent is None
    r_lse, r_logp, _ = ref_stats(linear_logits64(hid, w, b), t, 1.0)
    assert_close(lse, r_lse, torch.float16)
    assert_close(logp, r_logp, torch.float16)


def test_fused_linear_stats_large_magnitude():
    hid, w, b, t = make_linear(7, 100, 24, torch.float32, True, scale=3e3)  # |z| up to ~1e4
    logits64 = linear_logits64(hid, w, b)
    assert logits64.abs().max() > 3e3
    lse, logp, ent = fused_linear_stats(hid, w, b, t, 1.0, True)
    r_lse, r_logp, r_ent = ref_stats(logits64, t, 1.0)
    assert_close(lse, r_lse, torch.float32, "lse")
    assert_close(logp, r_logp, torch.float32, "logp")
    assert torch.isfinite(ent).all() and (ent.double().cpu() - r_ent).abs().max() < 1e-2


def test_fused_linear_stats_target_matters_and_edge_cases():
    hid, w, b, t = make_linear(9, 50, 24, torch.float32, False)
    _, logp, _ = fused_linear_stats(hid, w, b, t, 1.0, False)
    _, logp2, _ = fused_linear_stats(hid, w, b, (t + 7) % 50, 1.0, False)
    assert (logp != logp2).all()
    bad = t.clone()
    bad[0] = 50
    _, logp_bad, _ = fused_linear_stats(hid, w, b, bad, 1.0, False)
    assert torch.isnan(logp_bad[0]) and torch.isfinite(logp_bad[1:]).all()
    lse, logp, ent = fused_linear_stats(hid[:0], w, b, t[:0], 1.0, True)
    assert lse.shape == logp.shape == ent.shape == (0,)


def test_fused_linear_stats_argument_errors():
    hid, w, b, t = make_linear(4, 20, 16, torch.float32, True)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_stats(hid, w.to(torch.bfloat16), None, t, 1.0, False)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_stats(hid, w[:, :8], None, t, 1.0, False)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_stats(hid[None], w, None, t, 1.0, False)
    with pytest.raises(ValueError, match="bias"):
        fused_linear_stats(hid, w, b[:5], t, 1.0, False)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_stats(hid, w, b, t[:2], 1.0, False)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_stats(hid, w, b, t, -1.0, False)


# -------------------------------------------------------------------------------------- fused_linear_backward
def ref_backward(hid, w, b, t, grad, temperature):
    dz = ref_dz(linear_logits64(hid, w, b), t, grad, temperature)
    return dz @ w.double(), dz.T @ hid.double(), dz.sum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_linear_backward_matches_float64(dtype, bias, temperature):
    m, v, h = 33, 70, 40
    hid, w, b, t = make_linear(m, v, h, dtype, bias, scale=2.0)
    grad = make_grad(m)
    lse, _, _ = fused_linear_stats(hid, w, b, t, temperature, False)
    dh, dw, db = fused_linear_backward(hid, w, b, t, lse, grad, temperature, True, True, True)
    assert dh.dtype == dtype and dh.shape == (m, h)
    assert dw.dtype == torch.float32 and dw.shape == (v, h)
    assert db.dtype == torch.float32 and db.shape == (v,)
    r_dh, r_dw, r_db = ref_backward(hid, w, b, t, grad, temperature)
    assert_close(dh, r_dh, dtype, "d_hidden")
    assert_close(dw, r_dw, dtype, "d_weight")
    assert_close(db, r_db, dtype, "d_bias")
    assert (dh[grad == 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_linear_backward_with_entropy_gradient(dtype, temperature):
    m, v, h = 21, 70, 40
    hid, w, b, t = make_linear(m, v, h, dtype, True, scale=2.0)
    grad = make_grad(m)
    gen = torch.Generator().manual_seed(9)
    g_ent = torch.randn(m, generator=gen).to(DEVICE)
    g_ent[::5] = 0.0
    lse, _, ent = fused_linear_stats(hid, w, b, t, temperature, True)
    dh, dw, db = fused_linear_backward(hid, w, b, t, lse, grad, temperature, True, True, True, entropy=ent,
                                       grad_entropy=g_ent)
    dz = ref_dz_entropy(linear_logits64(hid, w, b).cpu(), t.cpu(), grad.cpu(), g_ent.cpu(), temperature)
    assert_close(dh, dz @ w.double().cpu(), dtype, "d_hidden")
    assert_close(dw, dz.T @ hid.double().cpu(), dtype, "d_weight")
    assert_close(db, dz.sum(0), dtype, "d_bias")
    both_zero = (grad == 0) & (g_ent == 0)
    assert both_zero.any() and (dh[both_zero] == 0).all()
    with pytest.raises(ValueError, match="entropy"):
        fused_linear_backward(hid, w, b, t, lse, grad, temperature, True, True, True, grad_entropy=g_ent)


def test_fused_linear_backward_flags_and_grad_zero_rows():
    m, v, h = 7, 37, 24
    hid, w, b, t = make_linear(m, v, h, torch.float32, True)
    grad = make_grad(m)
    lse, _, _ = fused_linear_stats(hid, w, b, t, 0.7, False)
    lse[grad == 0] = float("nan")  # rows with grad 0 must not read it
    r_dh, r_dw, r_db = ref_backward(hid, w, b, t, grad, 0.7)
    dh, dw, db = fused_linear_backward(hid, w, b, t, lse, grad, 0.7, False, True, False)
    assert dh is None and db is None
    assert_close(dw, r_dw, torch.float32, "d_weight")
    dh, dw, db = fused_linear_backward(hid, w, b, t, lse, grad, 0.7, True, False, True)
    assert dw is None
    assert_close(dh, r_dh, torch.float32, "d_hidden")
    assert_close(db, r_db, torch.float32, "d_bias")
    assert fused_linear_backward(hid, w, b, t, lse, grad, 0.7, False, False, False) == (None, None, None)


def test_fused_linear_backward_wrong_target_changes_gradient():
    hid, w, b, t = make_linear(7, 37, 24, torch.float32, False)
    grad = torch.ones(7).to(DEVICE)
    lse, _, _ = fused_linear_stats(hid, w, b, t, 1.0, False)
    dh, dw, _ = fused_linear_backward(hid, w, b, t, lse, grad, 1.0, True, True, False)
    dh2, dw2, _ = fused_linear_backward(hid, w, b, (t + 1) % 37, lse, grad, 1.0, True, True, False)
    assert rel_err(dh2, dh.double()) > 1e-2 and rel_err(dw2, dw.double()) > 1e-2


def test_fused_linear_backward_empty_and_all_zero_grad():
    hid, w, b, t = make_linear(5, 37, 24, torch.bfloat16, True)
    dh, dw, db = fused_linear_backward(hid[:0], w, b, t[:0], torch.zeros(0).to(DEVICE), torch.zeros(0).to(DEVICE),
                                       1.0, True, True, True)
    assert dh.shape == (0, 24) and dh.dtype == torch.bfloat16
    assert dw.shape == (37, 24) and (dw == 0).all() and db.shape == (37,) and (db == 0).all()
    dh, dw, db = fused_linear_backward(hid, w, b, t, torch.zeros(5).to(DEVICE), torch.zeros(5).to(DEVICE), 1.0,
                                       True, True, True)
    assert (dh == 0).all() and (dw == 0).all() and (db == 0).all()
    with pytest.raises(ValueError, match="grad"):
        fused_linear_backward(hid, w, b, t, torch.zeros(5).to(DEVICE), torch.zeros(4).to(DEVICE), 1.0,
                              True, True, True)


def _backward_case(dtype, gap, with_entropy, temperature=0.8, noise=1.0):
    """m = 33, v = 300 with columns [0, 32) raised by `gap` (0: a flat softmax), most targets there and two live
    rows' targets far out in low-probability tiles; returns inputs, the kernel's extra kwargs and float64 dz.
    noise < 1: hidden scaled by it and no random bias, so the other columns' log-probs sit close to one level."""
    m, v, h = 33, 300, 24
    hid, w, b, t = make_linear(m, v, h, dtype, True, scale=noise, seed=5)
    b = b.float().cpu() if noise >= 1.0 else torch.zeros(v)
    b = (b + gap * (torch.arange(v) < 32)).to(dtype).to(DEVICE)
    gen = torch.Generator().manual_seed(6)
    if gap:
        t = torch.randint(0, 32, (m,), generator=gen).to(DEVICE)
        t[1], t[20] = 200, 290  # live rows (g != 0) whose target tile must never be skipped
    grad = make_grad(m)
    g_ent = torch.randn(m, generator=gen).to(DEVICE) if with_entropy else None
    lse, _, ent = fused_linear_stats(hid, w, b, t, temperature, True)
    extra = dict(entropy=ent, grad_entropy=g_ent) if with_entropy else {}
    logits64 = linear_logits64(hid, w, b).cpu()
    if with_entropy:
        dz = ref_dz_entropy(logits64, t.cpu(), grad.cpu(), g_ent.cpu(), temperature)
    else:
        dz = ref_dz(logits64, t.cpu(), grad.cpu(), temperature)
    return (hid, w, b, t, lse, grad, temperature), extra, dz


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("grad_filter", [False, True])
def test_fused_linear_backward_filter_on_and_off_flat_softmax(dtype, with_entropy, grad_filter):
    args, extra, dz = _backward_case(dtype, 0.0, with_entropy)
    hid, w = args[0], args[1]
    skipped = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    dh, dw, db = fused_linear_backward(*args, True, True, True, **extra, grad_filter=grad_filter,
                                       skipped_tiles=skipped)
    assert_close(dh, dz @ w.double().cpu(), dtype, "d_hidden")
    assert_close(dw, dz.T @ hid.double().cpu(), dtype, "d_weight")
    assert_close(db, dz.sum(0), dtype, "d_bias")
    assert skipped.item() == 0  # flat softmax: nothing is below the threshold (and nothing counted when off)


def _filter_oracle(dz, t, grad, g_ent, temperature, dtype):
    """Per tile of the interpreter grid, from float64 dz: (tiles surely skipped, tiles surely kept, total) under
    the documented rule (no live target, every |dz_iv| <= u/V * (|g_i| + |e_i|) / T), with a 2x margin."""
    from grpo_kernels.kernels import fused_backward
    cfg = fused_backward._configs(torch.device("cpu"), dtype, False)[0]
    bm, bv = cfg["BLOCK_M"], cfg["BLOCK_V"]
    m, v = dz.shape
    scale = grad.double().abs() + (g_ent.double().abs() if g_ent is not None else 0.0)
    live = scale > 0
    ratio = dz.abs() / (scale / temperature).clamp_min(1e-300)[:, None]
    ratio[~live] = 0.0
    thr = fused_backward.filter_eps(dtype, v)
    sure_skip = sure_keep = 0
    for r0 in range(0, m, bm):
        for c0 in range(0, v, bv):
            rows = slice(r0, r0 + bm)
            tt = t[rows].long()
            target = bool((live[rows] & (tt >= c0) & (tt < c0 + bv)).any())
            worst = ratio[rows, c0:c0 + bv].max().item()
            sure_skip += (not target) and worst <= thr / 2
            sure_keep += target or worst >= 2 * thr
    return sure_skip, sure_keep, -(-m // bm) * -(-v // bv)


# gap > log(V / unit roundoff) (22.3 nats fp32, 11.2 bf16 at V = 300) plus the spread of the other logits and the
# entropy term's |log p| factor: every tile without a live target is skipped; the smaller gaps put the tiles'
# largest |dz| between the threshold and ~1e6 times it: nothing may be skipped there.
@pytest.mark.parametrize("dtype,gap,most", [(torch.float32, 34.0, True), (torch.bfloat16, 18.0, True),
                                            (torch.float32, 12.0, False), (torch.bfloat16, 3.0, False)])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_fused_linear_backward_filter_skips_exactly_the_negligible_tiles(dtype, gap, most, with_entropy):
    args, extra, dz = _backward_case(dtype, gap, with_entropy)
    hid, w, b, t, grad, temperature = args[0], args[1], args[2], args[3], args[5], args[6]
    ref = dz @ w.double().cpu(), dz.T @ hid.double().cpu(), dz.sum(0)
    g_ent = extra.get("grad_entropy")
    sure_skip, sure_keep, total = _filter_oracle(dz, t.cpu(), grad.cpu(), None if g_ent is None else g_ent.cpu(),
                                                 temperature, dtype)
    if most:
        assert sure_skip >= 0.6 * total  # the case is built so that most tiles ARE skipped
    else:
        assert sure_keep == total  # ... or none may be
    outs = {}
    for grad_filter in (False, True):
        skipped = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        outs[grad_filter] = fused_linear_backward(*args, True, True, True, **extra, grad_filter=grad_filter,
                                                  skipped_tiles=skipped)
        for got, exp, name in zip(outs[grad_filter], ref, ("d_hidden", "d_weight", "d_bias")):
            assert_close(got, exp, dtype, f"{name} (grad_filter={grad_filter})")
        if grad_filter:  # never a tile holding a live row's target, or one with an |dz| above the threshold
            assert sure_skip <= skipped.item() <= total - sure_keep
        else:
            assert skipped.item() == 0
    # the far targets' d_weight rows (g (1 - p) h with p ~ 0) are right with the filter on
    for col in (200, 290):
        assert_close(outs[True][1][col], ref[1][col], dtype, f"d_weight[{col}]")
    if not with_entropy:  # rows with g == 0 (and no entropy gradient) stay exactly 0
        assert (outs[True][0][grad.cpu() == 0] == 0).all()


@pytest.mark.parametrize("dtype,gap", [(torch.float32, 21.5), (torch.bfloat16, 10.5)])
def test_fused_linear_backward_filter_skips_tiles_just_below_the_threshold(dtype, gap):
    # the other columns' p ~ exp(-gap - log 32) sits ~3 nats (a factor ~15-20) below the threshold u/V: a filter
    # stricter than documented by a large factor would skip nothing here, a looser one is caught above
    args, extra, dz = _backward_case(dtype, gap, False, temperature=1.0, noise=0.05)
    hid, w, t, grad = args[0], args[1], args[3], args[5]
    from grpo_kernels.kernels import fused_backward
    live = grad.cpu() != 0
    rest = torch.cat([torch.arange(64, 192), torch.arange(224, 288)])  # vocab blocks without any target
    p_rest = (dz[live][:, rest].abs() / grad.cpu()[live].double().abs()[:, None]).max()
    assert fused_backward.filter_eps(dtype, 300) / 60 < p_rest < fused_backward.filter_eps(dtype, 300) / 4
    sure_skip, sure_keep, total = _filter_oracle(dz, t.cpu(), grad.cpu(), None, 1.0, dtype)
    assert sure_skip >= 0.6 * total
    skipped = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    out = fused_linear_backward(*args, True, True, True, skipped_tiles=skipped)
    assert sure_skip <= skipped.item() <= total - sure_keep
    for got, exp, name in zip(out, (dz @ w.double().cpu(), dz.T @ hid.double().cpu(), dz.sum(0)),
                              ("d_hidden", "d_weight", "d_bias")):
        assert_close(got, exp, dtype, name)


def test_fused_linear_backward_filter_never_hides_a_nan():
    # a peaked case whose non-target tiles are all skippable; a NaN lse on a live row must still reach the output
    args, extra, _ = _backward_case(torch.float32, 34.0, False)
    lse = args[4].clone()
    lse[2] = float("nan")  # row 2: g != 0 (make_grad zeroes rows 0, 3, ...)
    args = args[:4] + (lse,) + args[5:]
    dh, dw, _ = fused_linear_backward(*args, True, True, False)
    assert torch.isnan(dh[2]).all() and torch.isnan(dw).all()  # every tile of its row block was kept


def test_fused_linear_backward_filter_arguments():
    args, extra, _ = _backward_case(torch.float32, 0.0, False)
    with pytest.raises(TypeError, match="grad_filter"):
        fused_linear_backward(*args, True, True, True, grad_filter=1)
    with pytest.raises(ValueError, match="skipped_tiles"):
        fused_linear_backward(*args, True, True, True, skipped_tiles=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(TypeError, match="skipped_tiles"):
        fused_linear_backward(*args, True, True, True, skipped_tiles=[0])


# ------------------------------------------------------------------------------------- GPU compile (no GPU needed)
@pytest.mark.slow
def test_every_kernel_configuration_compiles_within_each_architectures_limits():
    """`python -m grpo_kernels.compile_check --arch 80,86,89,90`: every kernel configuration the library launches on
    sm_80/86/89/90 (the per-device tiles of kernels/configs.py) compiles through ptxas without a GPU, fits the
    architecture's shared memory, does not spill on sm_90, and its 16-bit GEMMs use tensor cores (HMMA / HGMMA,
    i.e. the operands stay 16-bit). Catches what the interpreter accepts but the compiler rejects."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "grpo_kernels.compile_check", "--arch", "80,86,89,90"], env=env,
                          cwd=root, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    out = proc.stdout
    for kernel in ("_chunk_stats_kernel", "_chunk_dlogits_kernel", "_fused_stats_kernel", "_combine_kernel",
                   "_fused_backward_kernel", "_token_loss_kernel"):
        for arch in (80, 86, 89, 90):
            assert f"{kernel} on sm_{arch} " in out, (kernel, arch)
    assert "all within limits" in out
