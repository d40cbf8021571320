"""Backend dispatch: which implementation of the kernel phases runs for a given device."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch

from . import env_flags, torch_ops


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Triton's own reading of TRITON_INTERPRET (1 / true / on / yes, any case)."""
    return env_flags.triton_interpret()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """'auto' is Triton on CUDA tensors and torch elsewhere; an explicit 'triton' is checked to be runnable."""
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() and dtype != torch.float64 else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the `triton` package (pip install triton); use backend='torch'")
        if dtype == torch.float64:
            raise ValueError("backend='triton' supports fp16, bf16 and fp32 inputs; use backend='torch' for float64")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(
                f"backend='triton' got tensors on {device}: Triton kernels need a CUDA device, or the Triton "
                "interpreter for CPU tensors (set TRITON_INTERPRET=1 before importing grpo_kernels); "
                "use backend='torch' on the CPU")
    return backend


def get_ops(backend: str) -> ModuleType:
    """The module implementing chunk_stats, chunk_dlogits_, fused_linear_stats and fused_linear_backward."""
    if backend == "triton":
        from . import kernels
        return kernels
    return torch_ops
