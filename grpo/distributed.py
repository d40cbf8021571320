"""Several processes (torchrun): process group from the environment, gathers, and gradient averaging.

Gradients are averaged with an explicit all-reduce after the last backward of each optimizer step, not with DDP:
the update calls the backbone and the fused loss directly (DDP's hooks only fire through the wrapper's forward),
and one reduction per optimizer step is also cheaper than DDP's one per micro-batch under accumulation.
Averaging matches DDP, so the losses keep TRL's per-rank normalizers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

_BUCKET_BYTES = 32 * 2**20  # gradients are flattened and reduced in buckets of about this size


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(force_group: bool = False) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); a single process otherwise.

    force_group: a process group even for one process (FSDP2 needs one, e.g. to resume a sharded run on 1 rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if (world > 1 or force_group) and not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in os.environ:  # plain `python`, no torchrun: a group of one
            dist.init_process_group(backend="nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend="nccl" if cuda else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_tensor(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate equally-shaped tensors from all ranks along dim 0 (rank order)."""
    if not info.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_object(obj, info: DistInfo) -> list:
    """Every rank's picklable object, in rank order."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flags: list[bool], info: DistInfo) -> list[bool]:
    """Each flag, true on every rank when it is true on any: for decisions that lead into a collective (a save,
    an evaluation, the end of the loop), which every rank must take alike. A collective itself."""
    if not info.enabled:
        return [bool(f) for f in flags]
    t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [v > 0 for v in t.tolist()]


def average_gradients(params, info: DistInfo) -> None:
    """All-reduce and average .grad across ranks, bucketed into flat buffers (as DDP would)."""
    if not info.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]

    def flush(bucket):
        flat = torch.cat([b.reshape(-1) for b in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(info.world_size)
        offset = 0
        for b in bucket:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    bucket, size = [], 0
    for g in grads:
        if bucket and (g.dtype != bucket[0].dtype or size >= _BUCKET_BYTES):
            flush(bucket)
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    if bucket:
        flush(bucket)


def reduce_metric_sums(sums: dict[str, list[float]], info: DistInfo) -> dict[str, list[float]]:
    """Sum {name: [sum, count]} over ranks in one collective (names sorted so all ranks agree)."""
    if not info.enabled or not sums:
        return sums
    names = sorted(sums)
    t = torch.tensor([v for n in names for v in sums[n]], dtype=torch.float64)
    if info.device.type == "cuda":
        t = t.to(info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t = t.cpu().tolist()
    return {n: [t[2 * i], t[2 * i + 1]] for i, n in enumerate(names)}


def destroy(info: DistInfo, wait: bool = False) -> None:
    """Tear the process group down. wait=True, for a normal end: a barrier first, so that no rank tears down its
    connections while another is still finishing the last collective. Not after an error: a rank that failed
    may never reach the barrier."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
