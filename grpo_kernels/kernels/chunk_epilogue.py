"""Epilogue kernels of the chunked strategy: the logits of a chunk of rows already sit in a [M, V] buffer (a cuBLAS
GEMM in the input dtype); these kernels turn them into per-row statistics, then overwrite them with dL/dlogits.
"""
import torch
import triton
import triton.language as tl

from ._common import (IS_INTERPRETER, check_float_matrix, check_grid, cdiv, inv_temperature, lse_finish, lse_init,
                      lse_update, prepare_row_vector, prepare_targets, row_major)


def _config(v: int) -> dict:
    if IS_INTERPRETER:  # several tiles per row and several rows per program even for tiny test shapes
        return dict(BLOCK_M=4, BLOCK_V=64, num_warps=1)
    # One row per program, streamed in tiles of up to 4096 columns (16 fp32 values per thread at 8 warps).
    block_v = min(4096, triton.next_power_of_2(v))
    return dict(BLOCK_M=1, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4)


@triton.jit(do_not_specialize=["M"])  # per-call sizes: no recompiles
def _chunk_stats_kernel(logits_ptr, targets_ptr, lse_ptr, logp_ptr, ent_ptr, M, V, stride_row, inv_t,
                        WITH_ENTROPY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per-row statistics of z = logits / T (fp32 math):
        lse_i = logsumexp_v z_iv,  logp_i = z_i[t_i] - lse_i,  entropy_i = lse_i - sum_v softmax(z_i)_v z_iv.
    Grid: (cdiv(M, BLOCK_M),); each program owns BLOCK_M rows and streams them once in BLOCK_V column tiles with
    the online (max, sum-exp, sum p*(z-max)) state of _common. logp is NaN for targets outside [0, V)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_row

    m, s, a = lse_init(BLOCK_M)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = (cols < V)[None, :]
        x = tl.load(row_ptr[:, None] + cols[None, :], mask=row_mask[:, None] & col_ok, other=0.0)
        # -inf only in the columns past V; padded rows stay finite (no NaN in their unused state)
        z = tl.where(col_ok, x.to(tl.float32) * inv_t, float("-inf"))
        m, s, a = lse_update(m, s, a, z, WITH_ENTROPY)
    lse, ent = lse_finish(m, s, a)

    tgt = tl.load(targets_ptr + rows, mask=row_mask, other=0)
    valid = (tgt >= 0) & (tgt < V) & row_mask
    z_t = tl.load(row_ptr + tgt, mask=valid, other=0.0).to(tl.float32) * inv_t
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logp_ptr + rows, tl.where(valid, z_t - lse, float("nan")), mask=row_mask)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, ent, mask=row_mask)


@triton.jit(do_not_specialize=["M"])  # per-call sizes: no recompiles
def _chunk_dlogits_kernel(logits_ptr, targets_ptr, lse_ptr, grad_ptr, M, V, stride_row, inv_t,
                          BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """In place: logits[i, v] <- grad_i * (1[v == t_i] - exp(logits[i, v] / T - lse_i)) / T (fp32 math, stored in
    the buffer's dtype). Grid: (cdiv(M, BLOCK_M),), BLOCK_M rows per program, BLOCK_V column tiles. A program
    whose rows all have grad 0 writes zeros without reading the row; rows with grad 0 are exact zeros whatever
    their lse holds."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_row
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    live = g != 0.0
    out_ty = logits_ptr.dtype.element_ty

    if tl.max(tl.abs(g), axis=0) == 0.0:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_mask[:, None] & (cols < V)[None, :]
            tl.store(row_ptr[:, None] + cols[None, :], tl.zeros([BLOCK_M, BLOCK_V], out_ty), mask=mask)
    else:
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        tgt = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
        g_t = g * inv_t
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_mask[:, None] & (cols < V)[None, :]
            ptrs = row_ptr[:, None] + cols[None, :]
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x * inv_t - lse[:, None])
            onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
            d = tl.where(live[:, None], g_t[:, None] * (onehot - p), 0.0)
            tl.store(ptrs, d.to(out_ty), mask=mask)


def _check_logits(logits):
    check_float_matrix("logits", logits)
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one column (V >= 1)")


def chunk_stats(logits, targets, temperature: float, return_entropy: bool):
    """z = logits / temperature (fp32 math); lse = logsumexp_v z; logp = z[target] - lse;
    entropy = lse - sum_v softmax(z)_v * z_v.

    logits: [M, V] fp32/bf16/fp16 (unit column stride used as is, otherwise copied); targets: [M] any integer
    dtype, in [0, V) (logp is NaN for a target outside it; no host-side check, it would sync the GPU).
    Returns (lse fp32[M], logp fp32[M], entropy fp32[M] or None)."""
    _check_logits(logits)
    inv_t = inv_temperature(temperature)
    m, v = logits.shape
    targets = prepare_targets(targets, m, logits.device)
    logits = row_major(logits)
    lse = torch.empty(m, dtype=torch.float32, device=logits.device)
    logp = torch.empty_like(lse)
    ent = torch.empty_like(lse) if return_entropy else None
    if m == 0:
        return lse, logp, ent
    cfg = _config(v)
    grid = (cdiv(m, cfg["BLOCK_M"]),)
    check_grid(grid[0])
    _chunk_stats_kernel[grid](logits, targets, lse, logp, ent if return_entropy else lse, m, v, logits.stride(0),
                              inv_t, WITH_ENTROPY=bool(return_entropy), **cfg)
    return lse, logp, ent


def chunk_dlogits_(logits, targets, lse, grad, temperature: float) -> None:
    """In place, overwrite the logits buffer with dL/d(raw logits):
        logits[i, v] = grad[i] * (1[v == target_i] - exp(logits[i, v] / T - lse[i])) / T,
    computed in fp32 and stored in the buffer's dtype. lse: [M] from chunk_stats; grad: [M] dL/dlogp (any float
    dtype, used as fp32). Rows with grad[i] == 0 become exact zeros. logits must have unit column stride (it is
    written in place, so it is never copied)."""
    _check_logits(logits)
    inv_t = inv_temperature(temperature)
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have unit column stride to be written in place, got strides {logits.stride()}")
    m, v = logits.shape
    targets = prepare_targets(targets, m, logits.device)
    lse = prepare_row_vector("lse", lse, m, logits.device)
    grad = prepare_row_vector("grad", grad, m, logits.device)
    if m == 0:
        return None
    cfg = _config(v)
    grid = (cdiv(m, cfg["BLOCK_M"]),)
    check_grid(grid[0])
    _chunk_dlogits_kernel[grid](logits, targets, lse, grad, m, v, logits.stride(0), inv_t, **cfg)
    return None
