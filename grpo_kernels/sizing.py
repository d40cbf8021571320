"""How a call is sized: which strategy runs and how many token rows one chunk of logits holds.

Memory on a GPU = driver free + what PyTorch's cache holds unused, less its inactive split blocks (a chunk needs one
contiguous block); the chunked strategy counts its chunk buffer (row stride round_up(V, 16)), d_hidden, and dW with
its cast copy. Chunk rows fill USABLE_FRACTION of that, at most CHUNK_CAP_BYTES of buffer and never under
CHUNK_FLOOR rows (below the floor: OutOfMemoryError saying what was needed; an OOM in the first chunk halves the
rows and retries, `chunk_driver.retry_smaller_chunks`). strategy="auto" depends only on shapes, dtype, gradient
needs, backend and the device's *total* memory, so a training loop gets the same strategy on every step. The rules and
why chunked is preferred whenever it fits (the cost models): docs/design.md, "Sizing" and "Strategies and cost
models". GRPO_KERNELS_DEBUG=1 (or DEBUG on the "grpo_kernels" logger) logs each call's choice and why.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional

import torch

from . import env_flags
from .row_layout import row_stride

_GIB = 1 << 30
_MIB = 1 << 20

CHUNK_FLOOR = 1024                 # rows
CHUNK_CAP_BYTES = int(2.5 * _GIB)  # chunk buffer (and its torch temporaries) beyond which GEMMs gain nothing
USABLE_FRACTION = 0.8              # of the available memory; the rest covers GEMM workspaces and fragmentation
AUTO_TOTAL_FRACTION = 8            # auto: chunked when its floor footprint <= total device memory / this
CPU_CHUNK_BYTES = 32 * _MIB        # CPU: small chunks cost little GEMM efficiency and keep temporaries small

log = logging.getLogger("grpo_kernels")
if env_flags.debug():
    if not log.handlers:
        log.addHandler(logging.StreamHandler())
    log.setLevel(logging.DEBUG)


@dataclasses.dataclass(frozen=True)
class Sizing:
    strategy: str      # "chunked" or "fused"
    chunk_size: int    # rows per chunk (unused by the fused strategy)
    reason: str


def _elt(dtype: torch.dtype) -> int:
    """Bytes of the chunk buffer / accumulator element: fp32, or fp64 for float64 inputs (torch backend)."""
    return 8 if dtype == torch.float64 else 4


def chunk_row_bytes(vocab: int, dtype: torch.dtype, torch_epilogue: bool) -> int:
    """Bytes one token row of a chunk costs: the fp32 buffer row (row stride round_up(V, 16)), plus the torch
    epilogue's temporaries in the buffer's dtype (two, plus the fp32 upcast of a 16-bit buffer)."""
    per_row = row_stride(vocab) * _elt(dtype)
    if torch_epilogue:
        per_row += vocab * _elt(dtype) * (2 if dtype in (torch.float32, torch.float64) else 3)
    return per_row


def accumulator_bytes(vocab: int, hidden: int, dtype: torch.dtype, weight_grad: bool) -> int:
    """What dW costs beside the chunks when there is more than one chunk and the weight needs a gradient: the fp32
    [V, H] accumulator, plus its final cast copy in the weight's dtype (none for fp32/fp64 weights)."""
    if not weight_grad:
        return 0
    cast = vocab * hidden * dtype.itemsize if dtype in (torch.float16, torch.bfloat16) else 0
    return vocab * hidden * _elt(dtype) + cast


def single_chunk_weight_bytes(vocab: int, hidden: int, dtype: torch.dtype, weight_grad: bool) -> int:
    """With one chunk: the [V, H] dW the GEMM writes in the weight's dtype, beside the chunk buffer."""
    return vocab * hidden * dtype.itemsize if weight_grad else 0


def hidden_grad_bytes(rows: int, hidden: int, dtype: torch.dtype) -> int:
    """d_hidden [rows, H] in the hidden states' dtype (rows = 0 when hidden needs no gradient)."""
    return int(rows) * hidden * dtype.itemsize


def inactive_split_bytes(device: torch.device) -> int:
    """Free pieces of the caching allocator's partly used segments: counted in reserved - allocated, but no
    allocation larger than the piece can use them."""
    try:
        return int(torch.cuda.memory_stats(device).get("inactive_split_bytes.all.current", 0))
    except (RuntimeError, AssertionError):  # allocator stats unavailable (e.g. another allocator backend)
        return 0


def available_bytes(device: torch.device) -> int:
    """Driver-free memory plus what PyTorch's caching allocator holds unused on `device`, less its inactive
    split blocks."""
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device) - inactive_split_bytes(device)
    return int(free) + max(0, int(cached))


@functools.lru_cache(maxsize=None)
def _total_bytes(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).total_memory)


def total_bytes(device: torch.device) -> int:
    return _total_bytes(device.index if device.index is not None else torch.cuda.current_device())


def _gib(n: int) -> str:
    return f"{n / _GIB:.2f} GiB"


def _balanced(n: int, max_rows: int) -> int:
    """Rows per chunk for n rows in chunks of at most max_rows, equal sizes (multiples of 256 where that fits)."""
    k = -(-n // max_rows)
    rows = -(-n // k)
    up = -(-rows // 256) * 256
    return up if up <= max_rows else rows


def default_chunk_size(num_rows: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device,
                       torch_epilogue: bool = False, weight_grad: bool = True, hidden_grad_rows: int = 0) -> int:
    """Rows per chunk of the chunked strategy for `num_rows` token rows (see the module docstring)."""
    return _chunk_rows(num_rows, vocab, hidden, dtype, device, torch_epilogue, weight_grad, hidden_grad_rows)[0]


def chunk_oom_message(device, n: int, rows: int, per_row: int, fixed: int, vocab: int, hidden: int, what: str) -> str:
    return (f"grpo_kernels: the chunked strategy needs {_gib(rows * per_row + fixed)} on {device} for {n} token "
            f"rows (a {rows}-row chunk of V={vocab} fp32 logits: {_gib(rows * per_row)}"
            + (f"; beside it the gradients' buffers (dW accumulator [{vocab}, {hidden}] and its cast, d_hidden): "
               f"{_gib(fixed)}" if fixed else "") + f") but {what}. Pass strategy='fused' (O(tokens) extra memory), "
            "a smaller chunk_size, or free memory.")


def _chunk_rows(num_rows, vocab, hidden, dtype, device, torch_epilogue, weight_grad,
                hidden_grad_rows=0) -> tuple[int, str]:
    n = max(int(num_rows), 1)
    per_row = chunk_row_bytes(vocab, dtype, torch_epilogue)
    if device.type != "cuda":
        rows = max(16, CPU_CHUNK_BYTES // per_row)
        return min(n, _balanced(n, rows)), f"CPU: chunk buffer up to {CPU_CHUNK_BYTES >> 20} MiB"
    avail = available_bytes(device)
    usable = int(avail * USABLE_FRACTION)
    where = f"{_gib(avail)} available on {device} (driver free + PyTorch cache), {USABLE_FRACTION:.0%} usable"
    d_hidden = hidden_grad_bytes(hidden_grad_rows, hidden, dtype)
    one = n * per_row
    if one <= CHUNK_CAP_BYTES and one + d_hidden + single_chunk_weight_bytes(vocab, hidden, dtype, weight_grad) <= usable:
        return n, f"all {n} rows fit in one chunk ({_gib(one)}); {where}"
    fixed = accumulator_bytes(vocab, hidden, dtype, weight_grad) + d_hidden
    max_rows = min(usable - fixed, CHUNK_CAP_BYTES) // per_row
    floor = min(CHUNK_FLOOR, n)
    if max_rows < floor:
        raise torch.cuda.OutOfMemoryError(chunk_oom_message(
            device, n, floor, per_row, fixed, vocab, hidden, f"only {_gib(usable)} of {_gib(avail)} available is usable"))
    rows = _balanced(n, max_rows)
    why = (f"{-(-n // rows)} chunks of <= {rows} rows ({_gib(rows * per_row)} each"
           + (f", + {_gib(fixed)} of dW accumulator / d_hidden" if fixed else "") + f"); {where}")
    return rows, why


def _strategy(strategy, num_rows, vocab, hidden, dtype, device, torch_epilogue, weight_grad) -> tuple[str, str]:
    if strategy != "auto":
        return strategy, "asked for"
    if device.type != "cuda":
        return "chunked", "auto on CPU"
    n = max(int(num_rows), 1)
    floor = min(CHUNK_FLOOR, n)
    need = floor * chunk_row_bytes(vocab, dtype, torch_epilogue)
    if n > floor:
        need += accumulator_bytes(vocab, hidden, dtype, weight_grad)
    limit = total_bytes(device) // AUTO_TOTAL_FRACTION
    pick = "chunked" if need <= limit else "fused"
    return pick, (f"auto: chunked needs {_gib(need)} at its {floor}-row floor, "
                  f"{'<=' if pick == 'chunked' else '>'} 1/{AUTO_TOTAL_FRACTION} of {device}'s total memory")


def size_call(what: str, strategy: str, chunk_size: Optional[int], num_rows: int, vocab: int, hidden: int,
              dtype: torch.dtype, device: torch.device, torch_epilogue: bool, weight_grad: bool,
              hidden_grad_rows: int = 0) -> Sizing:
    """Strategy and chunk rows for one call (a given chunk_size is used as is); logged at DEBUG level.
    hidden_grad_rows: rows of d_hidden when hidden needs a gradient (0 otherwise)."""
    strat, why_s = _strategy(strategy, num_rows, vocab, hidden, dtype, device, torch_epilogue, weight_grad)
    if strat != "chunked":
        chunk, why_c = chunk_size or max(int(num_rows), 1), "no chunks (fused)"
    elif chunk_size:
        chunk, why_c = chunk_size, "chunk_size given"
    else:
        chunk, why_c = _chunk_rows(num_rows, vocab, hidden, dtype, device, torch_epilogue, weight_grad,
                                   hidden_grad_rows)
    sizing = Sizing(strat, int(chunk), f"{why_s}; {why_c}")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("grpo_kernels %s: %d rows, V=%d, H=%d, %s on %s -> strategy=%s chunk_size=%d (%s)", what,
                  num_rows, vocab, hidden, str(dtype).replace("torch.", ""), device, sizing.strategy,
                  sizing.chunk_size, sizing.reason)
    return sizing
