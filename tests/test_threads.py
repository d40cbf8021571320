"""The default torch thread count: cores other processes keep busy, measured from fake /proc readings."""

from __future__ import annotations

import pytest
import torch

from grpo import threads

STAT = """cpu  {all}
cpu0 {c0}
cpu1 {c1}
intr 1 2 3
"""


def _proc(tmp_path, name, c0, c1, own_ticks):
    """A fake /proc/stat (two CPUs; fields user nice system idle iowait irq softirq steal) and /proc/self/stat."""
    stat = tmp_path / f"stat-{name}"
    stat.write_text(STAT.format(all="0 0 0 0 0 0 0 0", c0=" ".join(map(str, c0)), c1=" ".join(map(str, c1))))
    own = tmp_path / f"self-{name}"
    utime, stime = own_ticks
    own.write_text(f"42 (python a b) S 1 42 42 0 -1 4194304 0 0 0 0 {utime} {stime} 0 0 20 0 3 0 100 1 1\n")
    return str(stat), str(own)


def _measure(tmp_path, before, after, cpus=frozenset({0, 1})):
    readings = iter([threads.read_proc(*_proc(tmp_path, "a", *before)),
                     threads.read_proc(*_proc(tmp_path, "b", *after))])
    return threads.busy_elsewhere(set(cpus), window=0.0, read=lambda: next(readings), sleep=lambda s: None)


def test_reads_busy_and_total_ticks_per_cpu_and_own_ticks(tmp_path):
    files = _proc(tmp_path, "x", [10, 1, 5, 100, 4, 1, 1, 0], [0, 0, 0, 50, 0, 0, 0, 2], (7, 3))
    per_cpu, own = threads.read_proc(*files)
    assert per_cpu == {0: (18, 122), 1: (2, 52)} and own == 10


def test_quiet_machine_counts_no_busy_core_even_while_we_work(tmp_path):
    # Over 30 ticks per CPU, the CPUs were busy 25 + 5 ticks; all 30 were this process's own (its start-up work).
    busy = _measure(tmp_path, ([0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0], (100, 0)),
                    ([20, 0, 5, 5, 0, 0, 0, 0], [5, 0, 0, 25, 0, 0, 0, 0], (125, 5)))
    assert busy == 0.0
    assert threads.default_thread_count(2, busy) == 2


def test_one_core_kept_busy_by_another_process(tmp_path):
    # CPU 0 fully busy (30 of 30 ticks), CPU 1 idle; none of it ours.
    idle, cpu0_busy = ([0] * 8, [0] * 8, (0, 0)), ([30, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 30, 0, 0, 0, 0], (0, 0))
    busy = _measure(tmp_path, idle, cpu0_busy)
    assert busy == pytest.approx(1.0)
    assert threads.default_thread_count(2, busy) == 1


def test_only_the_cpus_this_process_may_use_count(tmp_path):
    # CPU 0 is busy but outside our affinity mask {1}.
    idle, cpu0_busy = ([0] * 8, [0] * 8, (0, 0)), ([30, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 30, 0, 0, 0, 0], (0, 0))
    busy = _measure(tmp_path, idle, cpu0_busy, cpus={1})
    assert busy == 0.0


def test_thread_count_rule():
    assert threads.default_thread_count(2, 0.3) == 2
    assert threads.default_thread_count(2, 0.8) == 1
    assert threads.default_thread_count(2, 9.0) == 1  # never 0
    assert threads.default_thread_count(8, 1.2, per_node=2) == 3  # torchrun: 7 free cores over 2 processes
    assert threads.default_thread_count(4, 0.0, torch_max=2) == 2


def test_set_num_threads_says_why(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
        torch.set_num_threads(4)
        line = threads.set_num_threads(measure=lambda cpus: 1.2)
        assert line.startswith("torch threads: 3 (4 cores available, other processes keep 1.2 busy")
        assert torch.get_num_threads() == 3

        def no_proc(cpus):
            raise OSError("no /proc")

        monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
        assert threads.set_num_threads(measure=no_proc).startswith("torch threads: 1 (4 cores available, 1-minute load")
        assert threads.set_num_threads(2).startswith("torch threads: 2 (--num_threads)")
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert "(OMP_NUM_THREADS=2)" in threads.set_num_threads()
    finally:
        torch.set_num_threads(before)


def test_real_proc_reading_is_in_range():
    if not hasattr(threads.os, "sched_getaffinity"):
        pytest.skip("needs Linux /proc")
    cpus = threads.os.sched_getaffinity(0)
    assert 0.0 <= threads.busy_elsewhere(cpus, window=0.05) <= len(cpus)
