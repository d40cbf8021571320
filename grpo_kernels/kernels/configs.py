"""Launch configurations of the GEMM kernels per device: pure functions of (compute capability, shared memory per
block, dtype, flags), so the choice is testable without a GPU and `grpo_kernels.compile_check` compiles exactly
what a device would launch.

Why per device (sm_90 compiles with Triton 3.9, `python -m grpo_kernels.compile_check` prints the numbers):
  - the fused backward's 16-bit tile 128 x 128 x 64 with 3 stages needs 160 KiB of shared memory on sm_90 and
    128 KiB on sm_80/86/89; sm_86/89 (A10, L4, L40S, RTX 3090/4090) allow 99 KiB per block, so it cannot launch
    there, and on sm_80 it compiles to 255 registers. 128 x 128 x 32 with 2 stages needs 64 KiB and ~180-210
    registers on sm_80/86/89: that is their config; sm_90 and later keep the large tile (wgmma).
  - each candidate's shared memory is bounded by smem_estimate (the K-loop's pipelined h and W tiles plus two
    [BLOCK_M, BLOCK_V] copies of dz for the dH / dW dots); the first candidate within the device's limit is
    chosen, and the wrappers fall back to the next one on Triton's OutOfResources.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

# Shared memory per block with opt-in (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes, by SM version: the limit
# when torch does not report it, and what compile_check checks each architecture's compiles against.
ARCH_SMEM = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 103: 232448, 120: 101376}


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    capability: tuple[int, int]
    smem_per_block: int


def limits_of(capability: tuple[int, int], reported_smem: int | None = None) -> DeviceLimits:
    """Limits of a device of this capability: the opt-in shared memory torch reports, else the table's."""
    arch = capability[0] * 10 + capability[1]
    smem = reported_smem or ARCH_SMEM.get(arch, 48 * 1024)
    return DeviceLimits(tuple(capability), int(smem))


@functools.lru_cache(maxsize=None)
def _cuda_limits(index: int) -> DeviceLimits:
    p = torch.cuda.get_device_properties(index)
    return limits_of((p.major, p.minor), getattr(p, "shared_memory_per_block_optin", None))


def device_limits(device: torch.device) -> DeviceLimits:
    """The limits of a CUDA device (cached per device)."""
    return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())


def _cfg(bm, bv, bk, warps, stages, group_m=8) -> dict:
    return dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages)


def smem_estimate(cfg: dict, dtype: torch.dtype) -> int:
    """Upper bound of a fused backward program's shared memory: num_stages buffers of the h and W K-slices plus two
    16-bit (fp32 for fp32 inputs) [BLOCK_M, BLOCK_V] dz operands: Triton 3.9's sm_90 dynamic shared memory (1 KiB of
    static shared memory comes on top), an upper bound on sm_80/86/89 (one dz copy there)."""
    elt = dtype.itemsize
    pipe = cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_V"]) * cfg["BLOCK_K"] * elt
    return pipe + 2 * cfg["BLOCK_M"] * cfg["BLOCK_V"] * elt


INTERPRETER_GEMM = _cfg(16, 32, 16, 4, 1, group_m=2)  # tl.dot needs >= 16 per dim; small tiles span several


def fused_backward_configs(capability: tuple[int, int], smem_per_block: int, dtype: torch.dtype,
                           with_entropy_grad: bool) -> list[dict]:
    """Candidates for the fused backward on this device, best first; the first is launched, the others are the
    fallbacks on OutOfResources. Every candidate fits `smem_per_block` by smem_estimate (the smallest is kept
    when none does)."""
    if dtype == torch.float32:  # fp32 dots run without tensor cores (ieee) unless TF32 is on: small tiles
        cands = [_cfg(64, 64, 32, 8, 2), _cfg(32, 32, 32, 4, 2)]  # 4 warps at 64 x 64 spill
    else:
        small = [_cfg(128, 128, 32, 8, 2), _cfg(64, 64, 32, 4, 2)]
        if tuple(capability) >= (9, 0):
            # the entropy-gradient variant spills a few registers at 3 stages (sm_90 ptxas, Triton 3.9), not at 2
            cands = [_cfg(128, 128, 64, 8, 2 if with_entropy_grad else 3)] + small
        else:  # sm_80/86/89: 128 x 128 x 64 exceeds 99 KiB (sm_86/89) or spills (sm_80)
            cands = small
    fits = [c for c in cands if smem_estimate(c, dtype) <= smem_per_block]
    return fits or cands[-1:]


def fused_forward_config(capability: tuple[int, int], smem_per_block: int, dtype: torch.dtype) -> dict:
    """The fused forward's tile on this device (no dz operands: 3 stages of 128 x 128 x 64 need 96 KiB)."""
    if dtype == torch.float32:
        return _cfg(64, 64, 32, 4, 2)
    cfg = _cfg(128, 128, 64, 8, 3)
    if cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_V"]) * cfg["BLOCK_K"] * dtype.itemsize > smem_per_block:
        cfg = _cfg(128, 128, 32, 8, 2)
    return cfg
