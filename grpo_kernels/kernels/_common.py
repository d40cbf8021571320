"""Pieces shared by the Triton kernels: interpreter detection, argument checks, the dot helper, the online
log-sum-exp state and grid helpers.

The online state of a row over the vocabulary columns seen so far is (m, s, a):
    m = running max of z,   s = sum_v exp(z_v - m),   a = sum_v exp(z_v - m) * (z_v - m).
Then lse = m + log(s) and entropy = lse - sum_v p_v z_v = log(s) - a / s. Keeping `a` relative to the running max
avoids the cancellation of `lse - E_p[z]` when |z| is large (~1e4).
"""
import functools
import math

import torch
import triton
import triton.language as tl

from ..env_flags import triton_interpret

IS_INTERPRETER = triton_interpret()  # read once: triton.jit decides interpreter vs compiler at import

# Under the interpreter tl.dot on bf16 operands is wrong (it multiplies the raw storage), so every dot operand is
# cast to fp32 there; on the GPU the operands stay in the input dtype for the tensor cores.
DOT_FP32 = IS_INTERPRETER

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Finite stand-in for -inf as the initial running max: (m - m_new) * s stays 0 instead of -inf * 0 = NaN.
NEG_BIG = tl.constexpr(-3.0e38)

MAX_GRID_X = 2**31 - 1

# Passed to every launch (a compile option given as a launch keyword): fused multiply-adds on, the numerics every
# kernel was checked with. Left unset, Triton 3.9 warns at each first compile and a later Triton may change the
# default, which would change the epilogues' rounding.
FP_FUSION = dict(enable_fp_fusion=True)


# ----------------------------------------------------------------------------------------------- host helpers
def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def check_grid(n_programs: int) -> None:
    if n_programs > MAX_GRID_X:
        raise ValueError(f"problem too large: {n_programs} programs exceed the grid limit {MAX_GRID_X}")


def inv_temperature(temperature) -> float:
    """1/temperature rounded to fp32 (the kernels multiply by it in fp32)."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}") from None
    if not math.isfinite(t) or t <= 0.0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(torch.tensor(1.0 / t, dtype=torch.float32))


def check_float_matrix(name: str, t, cols: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if cols is not None and t.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(t.shape)}")
    if not IS_INTERPRETER and t.device.type != "cuda":
        raise ValueError(f"{name} is on {t.device}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 "
                         "set before triton is imported, to interpret them on the CPU)")


def prepare_targets(targets, m: int, device) -> torch.Tensor:
    """Targets as a contiguous int32/int64 [m] tensor (any integer dtype accepted)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must have an integer dtype, got {targets.dtype}")
    if tuple(targets.shape) != (m,):
        raise ValueError(f"targets must have shape ({m},), got {tuple(targets.shape)}")
    check_device("targets", targets, device)
    if targets.dtype not in (torch.int32, torch.int64):
        targets = targets.to(torch.int64)
    return targets.contiguous()


def prepare_row_vector(name: str, t, m: int, device) -> torch.Tensor:
    """A float [m] tensor as contiguous fp32 (lse, grad)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
    if tuple(t.shape) != (m,):
        raise ValueError(f"{name} must have shape ({m},), got {tuple(t.shape)}")
    check_device(name, t, device)
    return t.to(torch.float32).contiguous()


def prepare_bias(bias, v: int, device):
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dtype not in FLOAT_DTYPES:
        raise ValueError(f"bias must be float32, bfloat16 or float16, got {bias.dtype}")
    if tuple(bias.shape) != (v,):
        raise ValueError(f"bias must have shape ({v},), got {tuple(bias.shape)}")
    check_device("bias", bias, device)
    return bias.contiguous()


def check_device(name: str, t: torch.Tensor, device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def row_major(t: torch.Tensor) -> torch.Tensor:
    """Kernels take a row stride but need unit column stride."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of tl.dot: fp32 operands follow torch's TF32 switch for matmuls (off by default, so fp32
    inputs get fp32 accuracy); it does not matter for bf16/fp16 operands."""
    if dtype == torch.float32 and not IS_INTERPRETER and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (1 on CPU, i.e. under the interpreter)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# --------------------------------------------------------------------------------------------- device helpers
@triton.jit
def mma(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation; operands cast to fp32 first when DOT_FP32 (interpreter only)."""
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)


@triton.jit
def logits_tile(h_rows, w_rows, b_ptr, cols, row_mask, col_mask, H, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_V] tile of hidden @ weight.T (+ bias): h_rows / w_rows point at the tile's rows of
    hidden and weight; the loop runs over H in BLOCK_K steps on the tensor cores (fp32 accumulation)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        h = tl.load(h_rows[:, None] + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows[:, None] + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        acc = mma(h, tl.trans(w), acc, DOT_FP32, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def lse_init(BLOCK_M: tl.constexpr):
    m = tl.full([BLOCK_M], NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    a = tl.zeros([BLOCK_M], tl.float32)
    return m, s, a


@triton.jit
def lse_update(m, s, a, z, WITH_ENTROPY: tl.constexpr):
    """Fold a [BLOCK_M, BLOCK_V] tile z (masked entries -inf) into the per-row online state (m, s, a)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    d = z - m_new[:, None]
    p = tl.exp(d)
    if WITH_ENTROPY:
        # p == 0 where d == -inf: keep 0 * -inf (NaN) out of the sum.
        a = alpha * (a + (m - m_new) * s) + tl.sum(p * tl.where(p > 0.0, d, 0.0), axis=1)
    s = alpha * s + tl.sum(p, axis=1)
    return m_new, s, a


@triton.jit
def lse_merge(m1, s1, a1, m2, s2, a2, WITH_ENTROPY: tl.constexpr):
    """Merge two online states of the same rows over disjoint column sets."""
    m = tl.maximum(m1, m2)
    e1 = tl.exp(m1 - m)
    e2 = tl.exp(m2 - m)
    if WITH_ENTROPY:
        a1 = e1 * (a1 + (m1 - m) * s1) + e2 * (a2 + (m2 - m) * s2)
    s = e1 * s1 + e2 * s2
    return m, s, a1


@triton.jit
def lse_finish(m, s, a):
    """(lse, entropy) of a final online state."""
    log_s = tl.log(s)
    return m + log_s, log_s - a / s
