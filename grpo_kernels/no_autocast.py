"""Every forward and backward body of the library runs with autocast off.

The library decides its own precision (GEMM operands in the input dtype, fp32 logits and accumulators, see
`torch_ops`). An enclosing `torch.autocast` would recast its GEMMs: `a @ b` of fp32 operands comes back in bf16,
so fp32 gradients were made in bf16 (and `index_copy_` of a bf16 block into the fp32 dH raised), and the
single-chunk dW silently lost its fp32 accumulation. With autocast off inside, a call under autocast returns
exactly what it returns without it.
"""

from __future__ import annotations

import contextlib
import functools

import torch

# Device types whose autocast state is switched off where it is on (the others never reach our ops).
_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (RuntimeError, TypeError, ValueError):  # a device type this torch build does not know
        return False


@contextlib.contextmanager
def autocast_disabled():
    """Turn autocast off on every device type where it is on, for the duration of the block."""
    with contextlib.ExitStack() as stack:
        for device_type in _DEVICE_TYPES:
            if _enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def no_autocast(fn):
    """Decorator: run `fn` inside `autocast_disabled()` (forward and backward of the autograd Functions, the public
    entry points). The backward needs it too: on the CPU it runs on the thread that called `.backward()`, inside
    whatever autocast region that thread is in."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with autocast_disabled():
            return fn(*args, **kwargs)
    return call
