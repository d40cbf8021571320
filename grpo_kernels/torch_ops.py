"""PyTorch versions of the kernel phases, with the same signatures as `grpo_kernels.kernels`, plus the fp32-output
GEMM helpers every path uses.

They are the CPU path (backend="torch") and make every strategy available without Triton. Math is in fp32
(fp64 for fp64 inputs); GEMM operands stay in the input dtype on the GPU.

Precision contract (docs/design.md, "Precision contract"): logits of 16-bit inputs are produced in fp32 (16-bit
operands, fp32 output) and never rounded to 16 bits before the softmax; dL/dlogits is rounded to the input dtype
only as a GEMM operand.

Gradient of the per-row outputs with respect to the logits z = (W h + b) / T, with p = softmax(z),
log p_v = z_v - lse and entropy H = -sum_v p_v log p_v:
    d logp / dz_v = 1[v = y] - p_v,        dH / dz_v = -p_v (log p_v + H),
so with upstream g = dL/dlogp and e = dL/dH, dL/dz_v = g (1[v = y] - p_v) - e p_v (log p_v + H), and dL/d(W h + b)
is that divided by T. The e-term is computed only when an entropy gradient is given.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional

import torch

from . import native
from .row_layout import row_stride

Tensor = torch.Tensor

# The fused strategy on the torch backend streams the vocabulary in tiles of about this many logits
# (M x tile), so its extra memory stays O(M) with a small constant. On the CPU the fp32 GEMM fallback upcasts
# operand slices of about this many elements at a time.
TILE_ELEMENTS = 4 << 20
# On CUDA a GEMM fallback (a torch without the fp32-output overloads) may hold this many bytes of fp32
# temporaries, or a quarter of the memory available, whichever is smaller.
CUDA_FALLBACK_BYTES = 512 << 20

_HALF = (torch.float16, torch.bfloat16)


def _vocab_tile(rows: int, vocab: int) -> int:
    return int(min(vocab, max(128, TILE_ELEMENTS // max(rows, 1))))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every path: fp64 for fp64 inputs, else fp32 (logits, lse, log-probs, g_t, sums)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------ fp32-output GEMMs

@dataclasses.dataclass(frozen=True)
class Fp32Gemm:
    """What this torch offers on one device type for 16-bit operands with an fp32 result, probed separately:
    mm:    torch.mm(a, b, out_dtype=fp32, out=out)                 (torch >= 2.8 on CUDA),
    addmm: torch.addmm(acc, a, b, out_dtype=fp32, out=acc), in place (some 2.8+ builds reject an fp32 `self`)."""

    device_type: str
    mm: bool
    addmm: bool


def _probe_operands(device_type: str, dtype: torch.dtype):
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype, device=device_type)
    b = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=dtype, device=device_type)
    return a, b, a.float() @ b.float()


def probe_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.mm(a, b, out_dtype=fp32, out=out) exists and gives the right values here."""
    try:
        a, b, want = _probe_operands(device_type, dtype)
        out = torch.empty(2, 2, dtype=torch.float32, device=device_type)
        torch.mm(a, b, out_dtype=torch.float32, out=out)
        return bool(torch.equal(out, want))
    except (TypeError, NotImplementedError, RuntimeError):
        return False


def probe_addmm(device_type: str, dtype: torch.dtype) -> bool:
    """Whether the in-place torch.addmm(acc, a, b, out_dtype=fp32, out=acc) exists and accumulates right here."""
    try:
        a, b, prod = _probe_operands(device_type, dtype)
        acc = torch.full((2, 2), 1.0 / 3.0, dtype=torch.float32, device=device_type)
        want = acc + prod
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.equal(acc, want))
    except (TypeError, NotImplementedError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def fp32_gemm(device_type: str, dtype: torch.dtype) -> Fp32Gemm:
    """The probed Fp32Gemm of a device type (once per process). The CPU answer is no overloads without probing:
    CPU builds of torch 2.13 register mm/addmm's out_dtype overloads for Meta only, and torch's CPU 16-bit GEMMs
    are many times slower than the exact upcast below anyway."""
    if device_type != "cuda":
        return Fp32Gemm(device_type, False, False)
    return Fp32Gemm(device_type, probe_mm(device_type, dtype), probe_addmm(device_type, dtype))


_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"grpo_kernels: {message}", RuntimeWarning, stacklevel=3)


def fallback_bytes(device: torch.device) -> int:
    """Bytes of fp32 temporaries a GEMM fallback may hold: 2 * TILE_ELEMENTS fp32 values on the CPU; on CUDA
    CUDA_FALLBACK_BYTES or a quarter of the memory available (driver free + PyTorch's cache), the smaller."""
    if device.type != "cuda":
        return 8 * TILE_ELEMENTS  # about the slices of the earlier TILE_ELEMENTS // max(rows, cols) rule
    from .sizing import available_bytes  # sizing imports this module
    return int(min(CUDA_FALLBACK_BYTES, max(available_bytes(device) // 4, 1 << 20)))


def _mm_out_dtype(a: Tensor, b: Tensor, out: Tensor) -> None:
    torch.mm(a, b, out_dtype=out.dtype, out=out)


def _addmm_out_dtype_(out: Tensor, a: Tensor, b: Tensor) -> None:
    torch.addmm(out, a, b, out_dtype=out.dtype, out=out)


def _accumulate_by_row_blocks(out: Tensor, a: Tensor, b: Tensor, budget: int) -> None:
    """out += a @ b through one fp32 temporary of at most `budget` bytes: mm(out_dtype) per block of out's rows
    (per vocabulary block for dW), then an in-place add. Traffic: out read and written once."""
    rows, cols = out.shape
    block = max(1, min(rows, budget // max(4 * cols, 1)))
    tmp = torch.empty(block, cols, dtype=out.dtype, device=out.device)
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        t = tmp[: r1 - r0]
        _mm_out_dtype(a[r0:r1], b, t)
        out[r0:r1] += t


def _upcast_gemm(out: Tensor, a: Tensor, b: Tensor, accumulate: bool, budget: int) -> None:
    """out (+)= a @ b with the operands upcast to out's dtype slice by slice along the reduction dimension; each
    slice's fp32 copies of a and b fit in `budget` bytes. Exact (products of 16-bit values are exact in fp32);
    every slice rewrites out, so the fewer slices the better."""
    K = a.shape[1]
    if K == 0:
        if not accumulate:
            out.zero_()
        return
    step = max(1, budget // (out.element_size() * max(a.shape[0] + b.shape[1], 1)))
    for k0 in range(0, K, step):
        k1 = min(K, k0 + step)
        a_k, b_k = a[:, k0:k1].to(out.dtype), b[k0:k1].to(out.dtype)
        if k0 == 0 and not accumulate:
            torch.mm(a_k, b_k, out=out)
        else:
            out.addmm_(a_k, b_k)


def gemm_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool = False) -> Tensor:
    """out (+)= a @ b with `out` fp32/fp64 and a, b in their own (equal) dtype; returns out. Never rounds the
    result to 16 bits.

    16-bit operands (Fp32Gemm, probed once per device type):
      - mm(out_dtype) for a plain product (the logits), in-place addmm(out_dtype) to accumulate (dW): one cuBLAS
        call each, no second [rows, cols] buffer;
      - without the in-place addmm, accumulation goes through a bounded fp32 temporary per block of out's rows;
      - without mm(out_dtype) (the CPU; torch < 2.8 on CUDA) the operands are upcast slice by slice, the slices
        sized by `fallback_bytes`. On CUDA each fallback warns once: it is slower than the fast path."""
    if a.dtype == out.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return out
    if a.dtype in _HALF:
        cap = fp32_gemm(a.device.type, a.dtype)
        cuda = cap.device_type == "cuda"
        if accumulate and cap.addmm:
            _addmm_out_dtype_(out, a, b)
            return out
        if cap.mm:
            if not accumulate:
                _mm_out_dtype(a, b, out)
                return out
            if cuda:
                _warn_once(f"addmm-{a.dtype}", f"torch {torch.__version__} has no in-place addmm(out_dtype=fp32) "
                           f"for {a.dtype} on CUDA: gradients accumulate through a bounded fp32 temporary")
            _accumulate_by_row_blocks(out, a, b, fallback_bytes(out.device))
            return out
        if cuda:
            _warn_once(f"mm-{a.dtype}", f"torch {torch.__version__} has no mm(out_dtype=fp32) for {a.dtype} on "
                       "CUDA: fp32-output GEMMs upcast their operands slice by slice (slower; torch >= 2.8 has the "
                       "fast path)")
    _upcast_gemm(out, a, b, accumulate, fallback_bytes(out.device))
    return out


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in the operands' dtype (fp32 accumulation). On the CPU 16-bit operands go through gemm_into's exact
    upcast and one final rounding: torch's CPU bf16/fp16 GEMMs are many times slower (strided ones more so); on
    CUDA cuBLAS takes the 16-bit operands as they are."""
    if a.dtype in _HALF and not a.is_cuda:
        out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
        return gemm_into(out, a, b).to(a.dtype)
    return a @ b


def empty_rows(rows: int, vocab: int, dtype: torch.dtype, device) -> Tensor:
    """An uninitialised [rows, vocab] buffer whose rows start every row_stride(vocab) elements (aligned rows, also
    for the packed 16-bit view over them when vocab % 4 != 0); the view [:, :vocab] of a padded allocation."""
    return torch.empty(rows, row_stride(vocab), dtype=dtype, device=device)[:, :vocab]


def linear_fp32(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """h @ weight.T + bias as a new fp32 (fp64 for fp64 inputs) [M, V] tensor with aligned rows (row stride
    row_stride(V)): the chunk's logits buffer."""
    out = empty_rows(h.shape[0], weight.shape[0], acc_dtype(h.dtype), h.device)
    gemm_into(out, h, weight.T)
    if bias is not None:
        out.add_(bias)
    return out


# --------------------------------------------------------------------------------------------- chunk epilogue

def _scaled(logits: Tensor, temperature: float) -> Tensor:
    """logits / T in the accumulation dtype (no copy for fp32 logits at T = 1)."""
    z = logits.to(acc_dtype(logits.dtype))
    return z if temperature == 1.0 else z * (1.0 / temperature)


def chunk_stats(logits: Tensor, targets: Tensor, temperature: float, return_entropy: bool):
    """lse, logp and entropy of z = logits / temperature, row by row (see kernels.chunk_epilogue)."""
    native_out = native.chunk_stats(logits, targets, temperature, return_entropy)  # None: not applicable
    if native_out is not None:
        return native_out
    z = _scaled(logits, temperature)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets.long().unsqueeze(1)).squeeze(1) - lse
    entropy = None
    if return_entropy:  # -sum p*log p, not lse - sum p*z: the latter cancels catastrophically for |z| ~ 1e3
        logprobs = z - lse.unsqueeze(1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
    return lse, logp, entropy


def pack_rows_(buf: Tensor, dtype: torch.dtype) -> Tensor:
    """Round the fp32 [M, V] `buf` (unit column stride) to the 16-bit `dtype` into the first half of each row's own
    storage and return that [M, V] view (row stride 2 * buf.stride(0), unit column stride).

    Columns [v0, v1) land on bytes [2 v0, 2 v1) of the row, which held fp32 columns [v0 / 2, v1 / 2): with blocks
    that at most double (v1 <= 2 v0) those are all already converted, and source and destination never overlap.
    The first block goes through a small copy."""
    M, V = buf.shape
    if buf.stride(1) != 1:  # V == 1: any column stride is unit
        buf = buf.as_strided((M, V), (buf.stride(0), 1))
    out = buf.view(dtype)[:, :V]
    first = min(V, 256)
    out[:, :first].copy_(buf[:, :first].to(dtype))
    v0 = first
    while v0 < V:
        v1 = min(V, 2 * v0)
        out[:, v0:v1].copy_(buf[:, v0:v1])
        v0 = v1
    return out


def logits_grad_(buf: Tensor, cols: Tensor, grad: Tensor, temperature: float, entropy: Optional[Tensor] = None,
                 grad_entropy: Optional[Tensor] = None, owned: Optional[Tensor] = None) -> Tensor:
    """The one dL/dz rule of the PyTorch paths, in place over buf's columns of the vocabulary:
    buf <- dL/d(W h + b) = [g (1[v = y] - p_v) - e p_v (log p_v + H)] / T, p the softmax over the whole vocabulary.

    buf holds p_v, or log p_v when grad_entropy (e) is given (the e-term needs both: p is then one transient
    buffer); g = grad, H = entropy. The one-hot adds g / T at column cols[i] of row i, only on the rows where
    `owned` is True (the target lies among buf's columns: a vocabulary tile or shard), on every row when None."""
    scale = (grad.to(buf.dtype) / temperature).unsqueeze(1)
    if grad_entropy is None:
        buf.mul_(-scale)
    else:  # -p (g + e (log p + H)) / T, built in the log p buffer
        p = torch.exp(buf)
        e = (grad_entropy.to(buf.dtype) / temperature).unsqueeze(1)
        buf.add_(entropy.to(buf.dtype).unsqueeze(1)).mul_(e).add_(scale).mul_(p).neg_()
        del p
    one_hot = scale if owned is None else torch.where(owned.unsqueeze(1), scale, torch.zeros_like(scale))
    return buf.scatter_add_(1, cols.long().unsqueeze(1), one_hot)


def chunk_dlogits_(logits: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, temperature: float,
                   entropy: Optional[Tensor] = None, grad_entropy: Optional[Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """In place: logits <- dL/d(raw logits) = [g (onehot(target) - p) - e p (log p + H)] / T with p the softmax of
    logits / T, g = grad, and the e-term only when grad_entropy (e) is given (entropy H from chunk_stats then).

    Returns the result: `logits` itself, or with a 16-bit `out_dtype` and an fp32 buffer the strided 16-bit view
    written over the first half of each row (pack_rows_). For fp32/fp64 buffers without the entropy term every
    step is in place; the entropy term needs one temporary of the chunk's size."""
    if native.chunk_dlogits_(logits, targets, lse, grad, temperature, entropy, grad_entropy, out_dtype) is not None:
        return logits  # the C++ epilogue (CPU fp32/fp64, in place); None: not applicable
    acc = acc_dtype(logits.dtype)
    p = logits if logits.dtype == acc else logits.to(acc)
    if temperature != 1.0:
        p.mul_(1.0 / temperature)
    p.sub_(lse.to(acc).unsqueeze(1))  # log p
    if grad_entropy is None:
        p.exp_()
    logits_grad_(p, targets, grad, temperature, entropy, grad_entropy)
    if p is not logits:
        logits.copy_(p)
    if out_dtype is not None and out_dtype != logits.dtype:
        return pack_rows_(logits, out_dtype)
    return logits


# ------------------------------------------------------------------------------------------- fused strategy

def _logits_tile(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], v0: int, v1: int) -> Tensor:
    return linear_fp32(hidden, weight[v0:v1], None if bias is None else bias[v0:v1])


def fused_linear_stats(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
                       return_entropy: bool):
    """Vocabulary-tiled forward with an online logsumexp: never holds more than one M x tile block of logits.
    The entropy sum is kept relative to the running max (a = sum_v e^{z_v - m} (z_v - m)), which avoids the
    cancellation of lse - E_p[z] for |z| ~ 1e3: entropy = log s - a / s."""
    M, V = hidden.shape[0], weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    tgt = targets.long()
    run_max = torch.full((M,), float("-inf"), dtype=acc, device=hidden.device)
    run_sum = torch.zeros(M, dtype=acc, device=hidden.device)
    run_a = torch.zeros(M, dtype=acc, device=hidden.device)
    target_z = torch.zeros(M, dtype=acc, device=hidden.device)
    tile = _vocab_tile(M, V)
    for v0 in range(0, V, tile):
        v1 = min(V, v0 + tile)
        z = _logits_tile(hidden, weight, bias, v0, v1)
        if temperature != 1.0:
            z.mul_(1.0 / temperature)
        new_max = torch.maximum(run_max, z.max(dim=1).values)
        shift = torch.nan_to_num(run_max - new_max, nan=0.0, neginf=0.0)  # first tile: run_sum = run_a = 0
        scale = torch.exp(run_max - new_max)
        in_tile = (tgt >= v0) & (tgt < v1)
        picked = z.gather(1, (tgt - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
        target_z = torch.where(in_tile, picked, target_z)
        d = z.sub_(new_max.unsqueeze(1))
        e = torch.exp(d)
        if return_entropy:
            run_a = scale * (run_a + shift * run_sum) + (e * d).sum(1)
        run_sum = run_sum * scale + e.sum(1)
        run_max = new_max
    log_s = torch.log(run_sum)
    lse = run_max + log_s
    entropy = log_s - run_a / run_sum if return_entropy else None
    return lse, target_z - lse, entropy


def fused_linear_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, lse: Tensor,
                          grad: Tensor, temperature: float, need_hidden: bool, need_weight: bool, need_bias: bool,
                          entropy: Optional[Tensor] = None, grad_entropy: Optional[Tensor] = None):
    """Recompute fp32 logits tile by tile; dL/dlogits as in chunk_dlogits_ (entropy term only with grad_entropy),
    rounded to the input dtype as the GEMM operand; d_hidden (hidden's dtype), d_weight and d_bias (fp32) summed in
    fp32."""
    M, H = hidden.shape
    V = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    d_hidden = torch.zeros(M, H, dtype=acc, device=hidden.device) if need_hidden else None
    d_weight = torch.zeros(V, H, dtype=acc, device=hidden.device) if need_weight else None
    d_bias = torch.zeros(V, dtype=acc, device=hidden.device) if need_bias else None
    tile = _vocab_tile(M, V)
    for v0 in range(0, V, tile):
        v1 = min(V, v0 + tile)
        z = _logits_tile(hidden, weight, bias, v0, v1)
        local = targets.long() - v0
        in_tile = (local >= 0) & (local < v1 - v0)
        dz = z.mul_(1.0 / temperature).sub_(lse.to(acc).unsqueeze(1))  # log p over the tile's columns
        if grad_entropy is None:
            dz.exp_()
        # the one-hot lands only on rows whose target is in the tile
        logits_grad_(dz, local.clamp(0, v1 - v0 - 1), grad, temperature, entropy, grad_entropy, owned=in_tile)
        if need_bias:
            d_bias[v0:v1] += dz.sum(0)
        op = dz.to(hidden.dtype)
        if need_hidden:
            gemm_into(d_hidden, op, weight[v0:v1], accumulate=True)
        if need_weight:
            gemm_into(d_weight[v0:v1], op.T, hidden, accumulate=True)
    if d_hidden is not None:
        d_hidden = d_hidden.to(hidden.dtype)
    return d_hidden, d_weight, d_bias
