"""Epilogue kernels of the chunked strategy: the logits of a chunk of rows already sit in a [M, V] buffer (a cuBLAS
GEMM with operands in the input dtype and an fp32 output, so 16-bit inputs still get fp32 logits); these kernels
turn them into per-row statistics, then overwrite them with dL/dlogits, in fp32 or rounded to 16 bits over the
first half of each row (the operand of the two backward GEMMs).

Math (z = logits / T, p = softmax(z), log p = z - lse, H = -sum_v p_v log p_v):
    d logp / dz_v = 1[v = y] - p_v,   dH / dz_v = -p_v (log p_v + H);
with g = dL/dlogp and e = dL/dH, dL/dlogits_v = [g (1[v = y] - p_v) - e p_v (log p_v + H)] / T.
"""
import torch
import triton
import triton.language as tl

from ._common import (FP_FUSION, IS_INTERPRETER, check_float_matrix, check_grid, cdiv, inv_temperature, lse_finish, lse_init,
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
def _chunk_dlogits_kernel(logits_ptr, out_ptr, targets_ptr, lse_ptr, grad_ptr, ent_ptr, gent_ptr, M, V, stride_row,
                          stride_out, inv_t, WITH_ENTROPY_GRAD: tl.constexpr, PACKED: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """dL/d(raw logits) from the logits buffer, with z = logits / T, log p = z - lse, g = grad, e = grad_entropy:
        out[i, v] = [g_i (1[v == t_i] - p_iv) - e_i p_iv (log p_iv + H_i)] / T
    (fp32 math; the e-term only WITH_ENTROPY_GRAD, H = entropy). out is the buffer itself (same dtype), or PACKED:
    the 16-bit view over the first half of each fp32 row (row stride stride_out = 2 * stride_row in elements).
    Grid: (cdiv(M, BLOCK_M),), BLOCK_M rows per program sweeping BLOCK_V column tiles left to right.

    PACKED safety: tile [v0, v0 + BLOCK_V) is stored on bytes [2 v0, 2 v0 + 2 BLOCK_V) of its row, i.e. over fp32
    columns below v0 / 2 + BLOCK_V / 2 <= v0 + BLOCK_V, all loaded in this tile or an earlier one; the barrier
    between each tile's load and store makes every thread of the program finish those loads first.
    A program whose rows all have g = e = 0 writes zeros without reading; such rows are exact zeros whatever
    their lse holds. A row whose g or e is NaN is live (NaN != 0), so its NaN reaches the gradients."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    row_ptr = logits_ptr + rows.to(tl.int64) * stride_row
    out_row = out_ptr + rows.to(tl.int64) * stride_out
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    if WITH_ENTROPY_GRAD:
        ge = tl.load(gent_ptr + rows, mask=row_mask, other=0.0)
        live = (g != 0.0) | (ge != 0.0)
    else:
        live = g != 0.0
    # a count of `!= 0` rows, which a NaN passes: a max of |g| drops NaN on the GPU and propagates it in the
    # interpreter, and either way a NaN row must be computed (NaN rule), whatever BLOCK_M groups it with
    n_live = tl.sum(live.to(tl.int32), axis=0)
    out_ty = out_ptr.dtype.element_ty

    if n_live == 0:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_mask[:, None] & (cols < V)[None, :]
            tl.store(out_row[:, None] + cols[None, :], tl.zeros([BLOCK_M, BLOCK_V], out_ty), mask=mask)
    else:
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        tgt = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
        g_t = g * inv_t
        if WITH_ENTROPY_GRAD:
            ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
            e_t = ge * inv_t
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = row_mask[:, None] & (cols < V)[None, :]
            x = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            logp = x * inv_t - lse[:, None]
            p = tl.exp(logp)
            onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
            d = g_t[:, None] * (onehot - p)
            if WITH_ENTROPY_GRAD:
                d -= e_t[:, None] * p * (logp + ent[:, None])
            d = tl.where(live[:, None], d, 0.0)
            if PACKED:
                tl.debug_barrier()
            tl.store(out_row[:, None] + cols[None, :], d.to(out_ty, fp_downcast_rounding="rtne"), mask=mask)


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
                              inv_t, WITH_ENTROPY=bool(return_entropy), **cfg, **FP_FUSION)
    return lse, logp, ent


def chunk_dlogits_(logits, targets, lse, grad, temperature: float, entropy=None, grad_entropy=None,
                   out_dtype=None):
    """Overwrite the logits buffer with dL/d(raw logits), z = logits / T, p = softmax(z), log p = z - lse:
        out[i, v] = [grad[i] (1[v == target_i] - p[i, v]) - grad_entropy[i] p[i, v] (log p[i, v] + entropy[i])] / T
    computed in fp32; the entropy term only when grad_entropy is given (it then needs entropy from chunk_stats).
    lse: [M] from chunk_stats; grad, grad_entropy: [M] dL/dlogp and dL/dentropy (any float dtype, used as fp32).
    Rows with grad = grad_entropy = 0 become exact zeros. logits must have unit column stride (it is written in
    place, never copied).

    out_dtype None or logits' dtype: the result is stored in the buffer and `logits` is returned. A 16-bit
    out_dtype with an fp32 buffer: the result, rounded to out_dtype, is written over the first half of each
    row's own storage (no extra memory) and returned as a [M, V] view with row stride 2 * logits.stride(0)."""
    _check_logits(logits)
    inv_t = inv_temperature(temperature)
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have unit column stride to be written in place, got strides {logits.stride()}")
    m, v = logits.shape
    targets = prepare_targets(targets, m, logits.device)
    lse = prepare_row_vector("lse", lse, m, logits.device)
    grad = prepare_row_vector("grad", grad, m, logits.device)
    with_eg = grad_entropy is not None
    if with_eg:
        if entropy is None:
            raise ValueError("grad_entropy needs entropy (the per-row entropy from chunk_stats)")
        grad_entropy = prepare_row_vector("grad_entropy", grad_entropy, m, logits.device)
        entropy = prepare_row_vector("entropy", entropy, m, logits.device)
    packed = out_dtype is not None and out_dtype != logits.dtype
    if packed:
        if logits.dtype != torch.float32 or out_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"out_dtype={out_dtype} needs an fp32 logits buffer and a 16-bit out_dtype "
                             f"(got logits {logits.dtype})")
        unit = logits if logits.stride(1) == 1 else logits.as_strided((m, v), (logits.stride(0), 1))  # v == 1
        out = unit.view(out_dtype)[:, :v]
    else:
        out = logits
    if m == 0:
        return out
    cfg = _config(v)
    grid = (cdiv(m, cfg["BLOCK_M"]),)
    check_grid(grid[0])
    _chunk_dlogits_kernel[grid](logits, out, targets, lse, grad, entropy if with_eg else grad,
                                grad_entropy if with_eg else grad, m, v, logits.stride(0), out.stride(0), inv_t,
                                WITH_ENTROPY_GRAD=with_eg, PACKED=packed, **cfg, **FP_FUSION)
    return out
