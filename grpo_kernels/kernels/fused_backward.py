"""Backward kernel of the fused strategy: d_hidden, d_weight, d_bias from g = dL/dlogp (and e = dL/dentropy),
recomputing the logits tile by tile, never the whole [M, V]. dlogp/dz_v = 1[v = y] - p_v and
dH/dz_v = -p_v (log p_v + H), so one pass over the logits serves both gradients.

Cost: 6·N·H·V FLOPs (8·N·H·V with the forward) and N·V·H·(1/BV + 1/BM) fp32 atomic adds, O(N) extra memory:
atomic-bound unless the gradient filter skips tiles, hence the filter and the staggered K order. Derivation, the
filter's error bound and the rejected alternatives: docs/design.md, "Fused backward".
"""
import torch
import triton
import triton.language as tl

from triton.runtime.errors import OutOfResources

from ._common import (DOT_FP32, FP_FUSION, IS_INTERPRETER, cdiv, check_grid, dot_precision, inv_temperature,
                      logits_tile, mma, prepare_row_vector)
from .configs import INTERPRETER_GEMM, device_limits, fused_backward_configs
from .fused_forward import check_linear_inputs

# Unit roundoff of the dtype dz is rounded to for the GEMMs and the results are returned in.
_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _configs(device: torch.device, dtype: torch.dtype, with_entropy_grad: bool) -> list[dict]:
    """Launch candidates on this device, best first (kernels/configs.py)."""
    if IS_INTERPRETER:
        return [dict(INTERPRETER_GEMM)]
    lim = device_limits(device)
    return fused_backward_configs(lim.capability, lim.smem_per_block, dtype, with_entropy_grad)


# (device, dtype, entropy-grad flag) -> index of the candidate that launched: later calls start there
_chosen: dict = {}


def _launch(cfg: dict, m: int, v: int, args: tuple, flags: dict) -> None:
    num_m_blocks, num_v_blocks = cdiv(m, cfg["BLOCK_M"]), cdiv(v, cfg["BLOCK_V"])
    check_grid(num_m_blocks * num_v_blocks)
    _fused_backward_kernel[(num_m_blocks * num_v_blocks,)](*args, num_m_blocks, num_v_blocks, **flags, **cfg,
                                                           **FP_FUSION)


def _launch_first_that_fits(cfgs: list[dict], key, m: int, v: int, args: tuple, flags: dict) -> None:
    """Launch with the first candidate whose resources the device has: Triton raises OutOfResources before any
    program runs (nothing is written), so the next, smaller candidate can take over; later calls start there."""
    for i in range(_chosen.get(key, 0), len(cfgs)):
        try:
            _launch(cfgs[i], m, v, args, flags)
        except OutOfResources:
            if i == len(cfgs) - 1:
                raise
            continue
        _chosen[key] = i
        return


def filter_eps(dtype: torch.dtype, vocab: int) -> float:
    """Per-entry skip threshold of the gradient filter, relative to the row's gradient scale (|g| + |e|) / T."""
    return _UNIT_ROUNDOFF[dtype] / max(int(vocab), 1)


@triton.jit(do_not_specialize=["M", "num_m_blocks"])  # per-call sizes: no recompiles
def _fused_backward_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, ent_ptr, ge_ptr, dh_ptr, dw_ptr, db_ptr,
                           skip_ptr, M, V, H, stride_hm, stride_wv, inv_t, filter_eps, num_m_blocks, num_v_blocks,
                           HAS_BIAS: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr,
                           NEED_B: tl.constexpr, WITH_ENTROPY_GRAD: tl.constexpr, FILTER: tl.constexpr,
                           COUNT_SKIPS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                           GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """For one (row block, vocab block) tile:
        z_iv = (h_i . W_v + b_v) / T  (K-loop of tl.dot, fp32 accumulator),
        dz_iv = [g_i (1[v == t_i] - p_iv) - e_i p_iv (log p_iv + H_i)] / T,  log p_iv = z_iv - lse_i
            (e = dL/dentropy and H = entropy only WITH_ENTROPY_GRAD; 0 for rows with g_i == e_i == 0 and for
            out-of-range rows/cols),
        d_hidden[i, :] += dz_i: @ W[v, :],   d_weight[v, :] += dz_:v^T @ h[i, :],   d_bias[v] += sum_i dz_iv,
    each accumulated with fp32 atomic adds, over H in BLOCK_K slices (dz cast to the input dtype for the dots)
    starting at slice (pid_m + pid_v) mod num_k (staggered, docs/design.md, "Fused backward").
    FILTER: skip the tile's GEMMs and atomics when it holds no live row's target and every
    |dz_iv| <= filter_eps * (|g_i| + |e_i|) / T; COUNT_SKIPS adds 1 to skip_ptr[0] (int32) per skipped tile.
    Grid: (num_m_blocks * num_v_blocks,), ordered in groups of GROUP_M row blocks that sweep the vocab blocks
    together: consecutive programs share a W tile and a group's h blocks stay hot in L2. A row block whose g (and
    e) is all zero does nothing; a NaN g or e counts as live."""
    pid = tl.program_id(0)
    per_group = GROUP_M * num_v_blocks
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    if WITH_ENTROPY_GRAD:
        ge = tl.load(ge_ptr + rows, mask=row_mask, other=0.0)
        weight_of_rows = tl.abs(g) + tl.abs(ge)
    else:
        weight_of_rows = tl.abs(g)
    # live rows counted as `!= 0`, which a NaN passes (a max drops NaN on the GPU, propagates it in the
    # interpreter): a block holding a NaN row is always computed, so the NaN reaches the gradients (NaN rule)
    if tl.sum((weight_of_rows != 0.0).to(tl.int32), axis=0) > 0:
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        h_rows = h_ptr + rows.to(tl.int64) * stride_hm
        w_rows = w_ptr + cols.to(tl.int64) * stride_wv

        acc = logits_tile(h_rows, w_rows, b_ptr, cols, row_mask, col_mask, H, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K,
                          DOT_FP32, PRECISION)

        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
        logp = acc * inv_t - lse[:, None]
        p = tl.exp(logp)
        g_t = (g * inv_t)[:, None]
        if WITH_ENTROPY_GRAD:  # g (onehot - p) - e p (log p + H) = g onehot - p (g + e (log p + H))
            ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
            coef = g_t + (ge * inv_t)[:, None] * (logp + ent[:, None])
        else:
            coef = g_t
        onehot = cols[None, :] == tgt[:, None]
        live = (weight_of_rows != 0.0)[:, None] & col_mask[None, :]
        dz = tl.where(live, tl.where(onehot, g_t, 0.0) - p * coef, 0.0)

        if FILTER:  # entries that must reach the GEMMs: a live row's target, or |dz| above the row's threshold
            thr = (filter_eps * inv_t) * weight_of_rows  # (written as "not <=" so that a NaN is never skipped)
            must = live & (onehot | ~(tl.abs(dz) <= thr[:, None]))
            n_must = tl.sum(tl.sum(must.to(tl.int32), axis=1), axis=0)
        else:
            n_must = 1
        if n_must > 0:
            if NEED_B:
                tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
            if NEED_H or NEED_W:
                dz_in = dz.to(h_ptr.dtype.element_ty)
                dh_rows = dh_ptr + rows.to(tl.int64) * H
                dw_rows = dw_ptr + cols.to(tl.int64) * H
                num_k = tl.cdiv(H, BLOCK_K)
                k_first = (pid_m + pid_v) % num_k
                for kk in range(0, num_k):
                    ks = ((k_first + kk) % num_k) * BLOCK_K + tl.arange(0, BLOCK_K)
                    k_mask = ks < H
                    if NEED_H:
                        w = tl.load(w_rows[:, None] + ks[None, :], mask=col_mask[:, None] & k_mask[None, :],
                                    other=0.0)
                        dh = mma(dz_in, w, tl.zeros([BLOCK_M, BLOCK_K], tl.float32), DOT_FP32, PRECISION)
                        tl.atomic_add(dh_rows[:, None] + ks[None, :], dh, mask=row_mask[:, None] & k_mask[None, :],
                                      sem="relaxed")
                    if NEED_W:
                        h = tl.load(h_rows[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                                    other=0.0)
                        dw = mma(tl.trans(dz_in), h, tl.zeros([BLOCK_V, BLOCK_K], tl.float32), DOT_FP32, PRECISION)
                        tl.atomic_add(dw_rows[:, None] + ks[None, :], dw, mask=col_mask[:, None] & k_mask[None, :],
                                      sem="relaxed")
        elif COUNT_SKIPS:
            tl.atomic_add(skip_ptr, 1, sem="relaxed")


def fused_linear_backward(hidden, weight, bias, targets, lse, grad, temperature: float, need_hidden: bool,
                          need_weight: bool, need_bias: bool, entropy=None, grad_entropy=None, *,
                          grad_filter: bool = True, skipped_tiles=None):
    """dz[i, v] = [grad[i] (1[v == target_i] - p[i, v]) - grad_entropy[i] p[i, v] (log p[i, v] + entropy[i])] / T
    with z = (hidden @ weight.T + bias) / T recomputed tile by tile (never the whole [M, V]), log p = z - lse; the
    entropy term only when grad_entropy is given (entropy from fused_linear_stats then, else it costs nothing).

    Returns (d_hidden, d_weight, d_bias):
        d_hidden = dz @ weight     [M, H] in hidden's dtype,
        d_weight = dz.T @ hidden   [V, H] fp32,
        d_bias   = dz.sum(0)       [V] fp32,
    each None when not needed (its work skipped). lse: fp32 [M] from fused_linear_stats; grad: [M] dL/dlogp (any
    float dtype, used as fp32). Rows whose grad (and grad_entropy) is 0 contribute nothing (their lse is not
    used). With M == 0,
    d_hidden is empty and d_weight / d_bias are zeros. Accumulation uses fp32 atomics, so the low bits of the
    results depend on the order in which programs run.

    grad_filter (default True): skip tiles whose dz cannot matter at the input dtype's precision (docs/design.md, "Fused backward";
    the dropped part of each row is at most unit_roundoff * (|grad_i| + |grad_entropy_i|) / T in L1).
    skipped_tiles: optional int32 CUDA/CPU tensor of shape (1,) on hidden's device; the number of tiles the filter
    skipped is added to it (for tests and benchmarks)."""
    hidden, weight, bias, targets = check_linear_inputs(hidden, weight, bias, targets)
    inv_t = inv_temperature(temperature)
    m, h_dim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    lse = prepare_row_vector("lse", lse, m, dev)
    grad = prepare_row_vector("grad", grad, m, dev)
    need_hidden, need_weight, need_bias = bool(need_hidden), bool(need_weight), bool(need_bias)
    if not isinstance(grad_filter, bool):
        raise TypeError(f"grad_filter must be a bool, got {type(grad_filter).__name__}")
    if skipped_tiles is not None:
        if not isinstance(skipped_tiles, torch.Tensor):
            raise TypeError(f"skipped_tiles must be a torch.Tensor or None, got {type(skipped_tiles).__name__}")
        if skipped_tiles.dtype != torch.int32 or tuple(skipped_tiles.shape) != (1,) or skipped_tiles.device != dev:
            raise ValueError(f"skipped_tiles must be an int32 tensor of shape (1,) on {dev}, got "
                             f"{skipped_tiles.dtype} {tuple(skipped_tiles.shape)} on {skipped_tiles.device}")
    with_eg = grad_entropy is not None
    if with_eg:
        if entropy is None:
            raise ValueError("grad_entropy needs entropy (the per-row entropy from fused_linear_stats)")
        grad_entropy = prepare_row_vector("grad_entropy", grad_entropy, m, dev)
        entropy = prepare_row_vector("entropy", entropy, m, dev)

    dh = torch.zeros((m, h_dim), dtype=torch.float32, device=dev) if need_hidden else None
    dw = torch.zeros((v, h_dim), dtype=torch.float32, device=dev) if need_weight else None
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need_bias else None
    if m > 0 and (need_hidden or need_weight or need_bias):
        dummy = grad  # never dereferenced when its constexpr flag is off
        args = (hidden, weight, bias if bias is not None else dummy, targets, lse, grad,
                entropy if with_eg else dummy, grad_entropy if with_eg else dummy,
                dh if dh is not None else dummy, dw if dw is not None else dummy, db if db is not None else dummy,
                skipped_tiles if skipped_tiles is not None else targets,
                m, v, h_dim, hidden.stride(0), weight.stride(0), inv_t, filter_eps(hidden.dtype, v))
        flags = dict(HAS_BIAS=bias is not None, NEED_H=need_hidden, NEED_W=need_weight, NEED_B=need_bias,
                     WITH_ENTROPY_GRAD=with_eg, FILTER=grad_filter,
                     COUNT_SKIPS=grad_filter and skipped_tiles is not None, DOT_FP32=DOT_FP32,
                     PRECISION=dot_precision(hidden.dtype))

        cfgs = _configs(dev, hidden.dtype, with_eg)
        _launch_first_that_fits(cfgs, (str(dev), hidden.dtype, with_eg), m, v, args, flags)
    if dh is not None and dh.dtype != hidden.dtype:
        dh = dh.to(hidden.dtype)
    return dh, dw, db
