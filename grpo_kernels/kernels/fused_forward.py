"""Forward kernel of the fused strategy: per-row log-sum-exp, target log-prob and entropy of
z = (hidden @ weight.T + bias) / T without ever materializing z.

Cost: 2·N·H·V FLOPs, no atomics, O(N) extra memory (16 B per row and vocabulary split, merged by a combine pass).
Programs run in grouped order (GROUP_M row blocks × the splits) so that hidden and W tiles stay in L2; the
derivation: docs/design.md, "Fused forward".
"""
import torch
import triton
import triton.language as tl

from ._common import (DOT_FP32, FP_FUSION, IS_INTERPRETER, cdiv, check_device, check_float_matrix, check_grid,
                      dot_precision, inv_temperature, logits_tile, lse_finish, lse_init, lse_merge, lse_update, num_sms,
                      prepare_bias, prepare_targets, row_major)
from .configs import INTERPRETER_GEMM, device_limits, fused_forward_config


def _config(device: torch.device, dtype: torch.dtype) -> dict:
    if IS_INTERPRETER:  # tl.dot needs >= 16 per dim; small tiles so tiny test shapes still span several tiles
        return dict(INTERPRETER_GEMM)
    lim = device_limits(device)
    return fused_forward_config(lim.capability, lim.smem_per_block, dtype)


# Programs per SM the vocabulary split aims for: with one 128x128 program per SM (it uses ~250 registers/thread),
# several waves keep the idle tail of the last wave small.
WAVES = 4


def _pick_splits(num_m_blocks: int, num_v_tiles: int, sms: int, group_m: int) -> tuple[int, int]:
    """Split the vocabulary into (n_splits, tiles_per_split): enough splits that num_m_blocks * n_splits gives
    about WAVES waves of programs even when there are few row blocks, and at least cdiv(sms, group_m) so that one
    group of group_m row blocks times its splits fills the SMs (the concurrent programs then share hidden blocks
    in L2, docs/design.md, "Fused forward"); every split holds at least one tile."""
    want = max(1, min(num_v_tiles, max(cdiv(WAVES * sms, num_m_blocks), cdiv(sms, group_m))))
    tiles_per_split = cdiv(num_v_tiles, want)
    return cdiv(num_v_tiles, tiles_per_split), tiles_per_split


# per-call sizes: no recompiles
@triton.jit(do_not_specialize=["M", "num_m_blocks", "tiles_per_split", "plane", "n_splits"])
def _fused_stats_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, logp_ptr, ent_ptr, part_ptr,
                        M, V, H, stride_hm, stride_wv, inv_t, num_m_blocks, tiles_per_split, plane,
                        n_splits, HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
                        DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """z_iv = (sum_k h_ik W_vk + b_v) / T; per row i the online state (max, sum-exp, sum p*(z-max)) over a range of
    columns, plus z_i[t_i] when the target falls in that range.

    Grid: (num_m_blocks * n_splits,) in grouped order (Triton's matmul tutorial): pids run through groups of
    GROUP_M row blocks, within a group row block fastest, then split: the programs running together are a few
    row blocks times many splits, sharing hidden blocks and W tiles in L2 (docs/design.md, "Fused forward"). Each program takes
    BLOCK_M rows and the split's BLOCK_V tiles; each tile is a K-loop of tl.dot over BLOCK_K slices of H with an
    fp32 accumulator.
    SINGLE_SPLIT: write lse / logp / entropy directly; otherwise write the partial state (m, s, a, z_t) to
    part_ptr[4, n_splits, M] (plane = n_splits * M) for _combine_kernel."""
    pid = tl.program_id(0)
    per_group = GROUP_M * n_splits
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_s = (pid % per_group) // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    h_rows = h_ptr + rows.to(tl.int64) * stride_hm
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)

    m, s, a = lse_init(BLOCK_M)
    z_t = tl.zeros([BLOCK_M], tl.float32)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        w_rows = w_ptr + cols.to(tl.int64) * stride_wv
        acc = logits_tile(h_rows, w_rows, b_ptr, cols, row_mask, col_mask, H, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K,
                          DOT_FP32, PRECISION)
        z = acc * inv_t
        z_t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m, s, a = lse_update(m, s, a, tl.where(col_mask[None, :], z, float("-inf")), WITH_ENTROPY)

    if SINGLE_SPLIT:
        lse, ent = lse_finish(m, s, a)
        valid = (tgt >= 0) & (tgt < V)
        tl.store(lse_ptr + rows, lse, mask=row_mask)
        tl.store(logp_ptr + rows, tl.where(valid, z_t - lse, float("nan")), mask=row_mask)
        if WITH_ENTROPY:
            tl.store(ent_ptr + rows, ent, mask=row_mask)
    else:
        off = pid_s.to(tl.int64) * M + rows
        # planes m, s, a, z_t; int64 offsets (off is int64, so each `+ plane` stays int64)
        tl.store(part_ptr + off, m, mask=row_mask)
        tl.store(part_ptr + (off + plane), s, mask=row_mask)
        if WITH_ENTROPY:
            tl.store(part_ptr + (off + plane + plane), a, mask=row_mask)
        tl.store(part_ptr + (off + plane + plane + plane), z_t, mask=row_mask)


@triton.jit(do_not_specialize=["M", "n_splits", "plane"])  # per-call sizes: no recompiles
def _combine_kernel(part_ptr, t_ptr, lse_ptr, logp_ptr, ent_ptr, M, V, n_splits, plane,
                    WITH_ENTROPY: tl.constexpr, BLOCK_M: tl.constexpr):
    """Merge the n_splits partial states of each row (part_ptr[4, n_splits, M]) into lse, logp, entropy.
    Grid: (cdiv(M, BLOCK_M),)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    m, s, a = lse_init(BLOCK_M)
    z_t = tl.zeros([BLOCK_M], tl.float32)
    off = rows.to(tl.int64)  # int64: n_splits * M may exceed 2**31
    for _ in range(0, n_splits):
        m_j = tl.load(part_ptr + off, mask=row_mask, other=0.0)
        s_j = tl.load(part_ptr + (off + plane), mask=row_mask, other=1.0)
        if WITH_ENTROPY:
            a_j = tl.load(part_ptr + (off + plane + plane), mask=row_mask, other=0.0)
        else:
            a_j = s_j
        z_t += tl.load(part_ptr + (off + plane + plane + plane), mask=row_mask, other=0.0)
        m, s, a = lse_merge(m, s, a, m_j, s_j, a_j, WITH_ENTROPY)
        off += M
    lse, ent = lse_finish(m, s, a)
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    valid = (tgt >= 0) & (tgt < V)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(logp_ptr + rows, tl.where(valid, z_t - lse, float("nan")), mask=row_mask)
    if WITH_ENTROPY:
        tl.store(ent_ptr + rows, ent, mask=row_mask)


def check_linear_inputs(hidden, weight, bias, targets):
    """Shared argument checks of the fused wrappers; returns (hidden, weight, bias, targets) ready for a kernel."""
    check_float_matrix("hidden", hidden)
    check_float_matrix("weight", weight, cols=hidden.shape[1])
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    check_device("weight", weight, hidden.device)
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    bias = prepare_bias(bias, weight.shape[0], hidden.device)
    targets = prepare_targets(targets, hidden.shape[0], hidden.device)
    return row_major(hidden), row_major(weight), bias, targets


def fused_linear_stats(hidden, weight, bias, targets, temperature: float, return_entropy: bool):
    """Per-row statistics of z = (hidden @ weight.T + bias) / T, never materializing z:
        lse = logsumexp_v z,  logp = z[target] - lse,  entropy = lse - sum_v softmax(z)_v z_v.

    hidden [M, H] and weight [V, H] in the same dtype (fp32/bf16/fp16), bias [V] or None, targets [M] any integer
    dtype in [0, V) (logp is NaN outside it). Returns (lse, logp, entropy or None), fp32 [M]."""
    hidden, weight, bias, targets = check_linear_inputs(hidden, weight, bias, targets)
    inv_t = inv_temperature(temperature)
    m, h_dim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    lse = torch.empty(m, dtype=torch.float32, device=dev)
    logp = torch.empty_like(lse)
    ent = torch.empty_like(lse) if return_entropy else None
    if m == 0:
        return lse, logp, ent

    cfg = _config(dev, hidden.dtype)
    num_m_blocks = cdiv(m, cfg["BLOCK_M"])
    n_splits, tiles_per_split = _pick_splits(num_m_blocks, cdiv(v, cfg["BLOCK_V"]), num_sms(dev), cfg["GROUP_M"])
    check_grid(num_m_blocks * n_splits)
    part = torch.empty((4, n_splits, m), dtype=torch.float32, device=dev) if n_splits > 1 else lse
    _fused_stats_kernel[(num_m_blocks * n_splits,)](
        hidden, weight, bias if bias is not None else hidden, targets, lse, logp, ent if ent is not None else lse,
        part, m, v, h_dim, hidden.stride(0), weight.stride(0), inv_t, num_m_blocks, tiles_per_split,
        n_splits * m, n_splits, HAS_BIAS=bias is not None, WITH_ENTROPY=bool(return_entropy),
        SINGLE_SPLIT=n_splits == 1, DOT_FP32=DOT_FP32, PRECISION=dot_precision(hidden.dtype), **cfg,
        **FP_FUSION)
    if n_splits > 1:
        block = 16 if IS_INTERPRETER else 256
        _combine_kernel[(cdiv(m, block),)](part, targets, lse, logp, ent if ent is not None else lse, m, v, n_splits,
                                           n_splits * m, WITH_ENTROPY=bool(return_entropy), BLOCK_M=block,
                                           **FP_FUSION)
    return lse, logp, ent
