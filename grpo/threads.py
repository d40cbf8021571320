"""How many torch CPU threads a run uses: the cores that other processes leave free.

torch starts one intra-op thread per core it may use. While other processes keep cores busy, its threads wait for
each other at every parallel region (on the shared 2-core machine at load average 9, a 512x512 fp32 matmul took 4x
longer with 2 threads than with 1). So the default counts the cores other processes keep busy and leaves them out.

It counts them from the kernel's per-CPU busy time (`/proc/stat`) over a short window, minus this process's own CPU
time (`/proc/self/stat`) in the same window. The 1-minute load average is not used where /proc exists: it includes
this process's own start-up work (installing, dequantizing a model) and so once left a core idle on a quiet
machine for a whole run.
"""

from __future__ import annotations

import os
import time
from typing import Callable

WINDOW_SECONDS = 0.3  # at 100 ticks/s, 30 ticks per CPU: enough to tell a busy core from an idle one
ProcReading = tuple[dict[int, tuple[int, int]], int]  # ({cpu: (busy ticks, total ticks)}, this process's ticks)


def read_proc(stat_path: str = "/proc/stat", self_path: str = "/proc/self/stat") -> ProcReading:
    """Per-CPU (busy, total) ticks since boot, and this process's user + system ticks (all its threads)."""
    per_cpu = {}
    with open(stat_path) as f:
        for line in f:
            name, *values = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit()):
                continue
            v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal (guest is in user)
            idle = v[3] + v[4]
            per_cpu[int(name[3:])] = (sum(v) - idle, sum(v))
    with open(self_path) as f:
        fields = f.read().rpartition(")")[2].split()  # after "pid (comm)": comm may hold spaces
    return per_cpu, int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of proc(5))


def busy_elsewhere(cpus: set[int], window: float = WINDOW_SECONDS,
                   read: Callable[[], ProcReading] = read_proc, sleep: Callable[[float], None] = time.sleep) -> float:
    """Cores among `cpus` that other processes kept busy during `window` seconds (0 .. len(cpus))."""
    (before, self_before), _ = read(), sleep(window)
    after, self_after = read()
    cpus = [c for c in cpus if c in before and c in after]
    if not cpus:
        raise OSError("no per-CPU lines for this process's CPUs in /proc/stat")
    busy = sum(after[c][0] - before[c][0] for c in cpus)
    total = sum(after[c][1] - before[c][1] for c in cpus)
    if total <= 0:
        raise OSError("/proc/stat did not advance")
    ticks_per_cpu = total / len(cpus)
    own = self_after - self_before
    return min(float(len(cpus)), max(0.0, (busy - own) / ticks_per_cpu))


def default_thread_count(cores: int, busy: float, per_node: int = 1, torch_max: int | None = None) -> int:
    """The free cores (rounded), split over a torchrun node's processes, at least 1 and at most torch's own
    default."""
    free = round(cores - busy) // max(1, per_node)
    return max(1, min(torch_max or cores, free))


def set_num_threads(requested: int | None = None, measure: Callable[[set[int]], float] = busy_elsewhere) -> str:
    """Pick torch's CPU thread count and say why (printed at start). --num_threads, then OMP_NUM_THREADS, win."""
    import torch

    if requested:
        torch.set_num_threads(requested)
        return f"torch threads: {torch.get_num_threads()} (--num_threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        busy = measure(cpus)
        how = f"other processes keep {busy:.1f} busy"
    except OSError:  # no /proc (not Linux): the load average, which may include our own start-up
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        how = f"1-minute load average {busy:.1f}"
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    n = default_thread_count(len(cpus), busy, per_node, torch.get_num_threads())
    torch.set_num_threads(n)
    return (f"torch threads: {n} ({len(cpus)} cores available, {how}"
            + (f", {per_node} processes on this node" if per_node > 1 else "") + "; --num_threads N to override)")
