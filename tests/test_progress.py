"""Progress a person can read (a live bar in a terminal, phase and step lines with units in a log file) and what
reward_curve.png draws."""

from __future__ import annotations

import io
import os
import sys

import pytest

from grpo import logger as logger_lib
from grpo.logger import MetricsLogger, curve_series, format_seconds


@pytest.mark.parametrize("seconds, text", [(0.04, "0.0s"), (12.34, "12.3s"), (59.96, "60.0s"), (61, "1m01s"),
                                           (3599, "59m59s"), (3725, "1h02m")])
def test_format_seconds(seconds, text):
    assert format_seconds(seconds) == text


def test_log_file_gets_phase_lines_and_step_lines_with_units_elapsed_and_eta(tmp_path, capsys, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(logger_lib.time, "perf_counter", lambda: now[0])
    log = MetricsLogger(str(tmp_path), enabled=True, total_steps=4, disable_progress_bar=True)
    now[0] = 150.0
    log.start(2)  # resumed at step 2: elapsed and ETA count from here
    log.phase("generating", 3, "32 completions")
    log.phase("generating", 3, "32 completions")  # the same phase again: no second line
    log.phase("scoring", 3)  # short phases: no line in a log file
    now[0] = 180.0
    log.phase("updating", 3)
    row = log.log(3, {"grad_norm": 0.5})
    row.update({"reward": 0.25, "loss": 0.0, "completions/mean_length": 17.25, "step_time": 201.24})
    now[0] = 210.0
    log.step_line(row)  # 60 s for 1 step, 1 left
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[grpo] step 3/4: generating 32 completions (elapsed 0.0s)"
    assert lines[1] == "[grpo] step 3/4: updating (elapsed 30.0s)"
    assert lines[2] == ("[step 3/4] reward=0.25 loss=0 grad_norm=0.5 mean_length=17.2 tokens step_time=201.2s "
                        "elapsed 1m00s ETA 1m00s")
    assert len(lines) == 3


def _fake_terminal(monkeypatch, columns: int) -> io.StringIO:
    """sys.stderr as a TTY whose reported width is `columns` (a `script` capture reports 0)."""
    err = io.StringIO()
    err.isatty = lambda: True
    err.fileno = lambda: 2
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(logger_lib.os, "get_terminal_size", lambda fd=None: os.terminal_size((columns, 24)))
    return err


def test_terminal_gets_a_live_bar_with_phase(tmp_path, monkeypatch):
    err = _fake_terminal(monkeypatch, 120)
    log = MetricsLogger(str(tmp_path), enabled=True, total_steps=5, disable_progress_bar=False)
    log.start(0)
    assert log.bar is not None and log._ticker is not None and log._ticker.is_alive()
    log.phase("generating", 1)
    assert log.bar.desc == "grpo [generating]"
    log.phase("scoring", 1)
    assert log.bar.desc == "grpo [scoring]   "  # padded: the bar does not jump between phases
    log.step_line({"step": 1, "reward": 0.5})  # the bar shows progress: no extra line
    log.progress(1, {"step": 1, "reward": 0.5})
    ticker = log._ticker
    log.close()
    assert not ticker.is_alive() and log.bar is None
    shown = err.getvalue()
    assert "grpo [scoring]    1/5 steps" in shown and "reward=0.500" in shown and "<" in shown  # elapsed<ETA
    assert "[step 1/5]" not in shown


@pytest.mark.parametrize("columns", [0, 10])
def test_terminal_without_width_gets_step_lines(tmp_path, monkeypatch, capsys, columns):
    """A TTY that reports width 0 (or too narrow for the bar): tqdm would draw nothing for minutes; the per-step
    lines stand in."""
    err = _fake_terminal(monkeypatch, columns)
    log = MetricsLogger(str(tmp_path), enabled=True, total_steps=2, disable_progress_bar=False)
    log.start(0)
    assert log.bar is None
    log.phase("generating", 1)
    log.step_line({"step": 1, "reward": 0.5})
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[grpo] step 1/2: generating") and lines[1].startswith("[step 1/2] reward=0.5 ")
    assert err.getvalue() == ""


def test_stream_without_a_file_descriptor_gets_no_bar():
    class Wrapped:  # e.g. a logging wrapper that says it is a TTY but has no fileno
        def isatty(self):
            return True

    assert logger_lib.bar_drawable(Wrapped()) is False


def test_disabled_logger_is_silent(tmp_path, capsys):
    log = MetricsLogger(str(tmp_path / "x"), enabled=False, total_steps=3)
    log.start(0)
    log.phase("generating", 1)
    log.step_line({"step": 1, "reward": 0.5})
    log.close()
    assert capsys.readouterr().out == "" and not (tmp_path / "x").exists()


def test_curve_draws_evaluations_as_points_and_skips_duplicate_reward_lines():
    history = [{"step": 0, "eval/accuracy": 0.06}]
    for step in range(1, 17):
        r = 0.05 * step
        history.append({"step": step, "reward": r, "rewards/gsm8k/mean": r, "rewards/format/mean": 0.5 + r / 2})
    history.append({"step": 16, "eval/accuracy": 0.30})
    history.append({"step": 16, "eval/accuracy": 0.35})  # the same step evaluated again: keep the last
    series = {label: (steps, values, kind) for label, steps, values, kind in curve_series(history,
                                                                                         ["gsm8k", "format"])}
    assert "rewards/gsm8k/mean" not in series  # weight 1 of 1: identical to the train reward
    assert series["rewards/format/mean"][2] == "line"
    assert series["eval/accuracy (held out)"] == ([0, 16], [0.06, 0.35], "points")
    assert series["reward (train)"][0] == list(range(1, 17))


def test_reward_curve_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    history = [{"step": 0, "eval/accuracy": 0.1}, {"step": 1, "reward": 0.2}, {"step": 2, "reward": 0.3},
               {"step": 2, "eval/accuracy": 0.4}]
    path = logger_lib.plot_reward_curve(history, tmp_path / "c.png", ["gsm8k"])
    assert path is not None and path.stat().st_size > 1000
