"""Stage 5: metrics with TRL's names, and where they go.

Values are accumulated between logging steps and averaged (NaN-filtered, as TRL's `log`) when a step is logged.
Sinks (main rank only):
- progress for a person: in a terminal a live tqdm bar (steps, elapsed, ETA, current phase, reward); otherwise
  (a log file, or disable_progress_bar) a line when a long phase starts and one line per logged step with units,
  elapsed time and ETA;
- `<output_dir>/metrics.jsonl` (one object per logged step, with "step"), TensorBoard when report_to asks for it,
  `<output_dir>/completions.jsonl` when log_completions, and `<output_dir>/reward_curve.png` at the end.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path


def _clean(value):
    """JSON-safe float (NaN/inf become None, as TRL does for loggers that choke on NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# Phases announced by a line in a log file (the bar shows every phase); scoring and saving are usually short.
LONG_PHASES = ("generating", "updating", "evaluating")


def format_seconds(seconds: float) -> str:
    """12.3s, 4m05s, 1h02m."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


MIN_BAR_COLUMNS = 40  # narrower than this, tqdm's bar with its phase and ETA cannot be read


def bar_drawable(stream) -> bool:
    """Whether a live bar can be drawn on `stream`: a terminal that reports a usable width. A `script` capture and
    some CI logs are TTYs of width 0, where tqdm draws nothing; they get the per-step lines instead."""
    try:
        if not stream.isatty():
            return False
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # no fileno (a wrapped stream), or not a real terminal
        return False
    return columns >= MIN_BAR_COLUMNS


class MetricsLogger:
    def __init__(self, output_dir: str, *, enabled: bool, report_to=None, total_steps: int = 0,
                 disable_progress_bar: bool = False, log_completions: bool = False,
                 num_completions_to_print: int | None = None):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.pending: dict[str, list[float]] = defaultdict(list)
        self.history: list[dict] = []
        self.log_completions = log_completions and enabled
        self.num_completions_to_print = num_completions_to_print
        self.completions: list[dict] = []
        self.bar = None
        self.tb = None
        self.total_steps = total_steps
        self.use_bar = enabled and not disable_progress_bar and bar_drawable(sys.stderr)
        self._phase: tuple[str, int] | None = None
        self.t0 = time.perf_counter()  # reset by start()
        self.start_step = 0
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        reports = [report_to] if isinstance(report_to, str) else list(report_to or [])
        if "tensorboard" in reports:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(self.dir / "runs"))
            except ImportError:
                warnings.warn("report_to includes 'tensorboard' but tensorboard is not installed "
                              "(pip install tensorboard); metrics still go to metrics.jsonl", stacklevel=2)

    # -- progress ------------------------------------------------------------------------------------------------
    def start(self, step: int) -> None:
        """The loop begins (or resumes) at `step`: elapsed time and ETA count from here."""
        self.t0, self.start_step = time.perf_counter(), step
        if not self.use_bar:
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total_steps, initial=step, desc="grpo", unit="step", dynamic_ncols=True,
                        bar_format="{desc} {n_fmt}/{total_fmt} steps |{bar}| [{elapsed}<{remaining}]{postfix}")
        # tqdm redraws only when told: a ticker keeps elapsed time moving through minutes-long phases.
        self._ticker = threading.Thread(target=self._tick, name="grpo-progress", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            bar = self.bar
            if bar is not None:
                bar.refresh()

    def phase(self, name: str, step: int, detail: str = "") -> None:
        """The loop enters a phase (generating / scoring / updating / evaluating / saving) of step `step`."""
        if (name, step) == self._phase:
            return
        self._phase = (name, step)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description_str(f"grpo [{name + ']':<11}", refresh=True)  # fixed width: the bar stays put
        elif name in LONG_PHASES:
            print(f"[grpo] step {step}/{self.total_steps}: {name}{' ' + detail if detail else ''} "
                  f"(elapsed {format_seconds(self.elapsed())})", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self, step: int) -> float | None:
        """Seconds left at the mean pace of the steps done since start(); None before the first one."""
        done = step - self.start_step
        return self.elapsed() / done * (self.total_steps - step) if done > 0 else None

    def step_line(self, row: dict) -> None:
        """One line per logged step for a log file (the bar shows the same live)."""
        if not self.enabled or self.bar is not None:
            return
        step = row["step"]
        shown = [f"{k.split('/')[-1]}={row[k]:.4g}" for k in ("reward", "loss", "grad_norm", "entropy")
                 if row.get(k) is not None]
        if row.get("completions/mean_length") is not None:
            shown.append(f"mean_length={row['completions/mean_length']:.1f} tokens")
        if row.get("step_time") is not None:
            shown.append(f"step_time={row['step_time']:.1f}s")
        eta = self.eta(step)
        shown.append(f"elapsed {format_seconds(self.elapsed())}")
        if eta is not None:
            shown.append(f"ETA {format_seconds(eta)}")
        self.write(f"[step {step}/{self.total_steps}] " + " ".join(shown))

    # -- accumulation ------------------------------------------------------------------------------------------
    def add(self, name: str, value: float) -> None:
        self.pending[name].append(float(value))

    def add_many(self, values: dict) -> None:
        for k, v in values.items():
            self.add(k, v)

    def add_completions(self, step: int, prompts, completions, rewards: dict[str, list], advantages) -> None:
        if not self.log_completions:
            return
        for i, (p, c) in enumerate(zip(prompts, completions)):
            self.completions.append({
                "step": step, "prompt": p, "completion": c,
                "rewards": {name: _clean(vals[i]) for name, vals in rewards.items()},
                "advantage": _clean(advantages[i]),
            })

    # -- flushing ----------------------------------------------------------------------------------------------
    def log(self, step: int, extra: dict | None = None) -> dict:
        """Average what was accumulated, add `extra`, write to every sink; returns the logged row."""
        row = {"step": step}
        for name, values in self.pending.items():
            valid = [v for v in values if not math.isnan(v)]
            row[name] = sum(valid) / len(valid) if valid else None
        row.update(extra or {})
        row = {k: (v if k == "step" else _clean(v)) for k, v in row.items()}
        self.pending.clear()
        self._write(row, step)
        if self.enabled:
            self._flush_completions()
        return row

    def _write(self, row: dict, step: int) -> None:
        """Append a row to the history, metrics.jsonl and TensorBoard (train metrics under train/)."""
        self.history.append(row)
        if not self.enabled:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(k if k.startswith("eval/") else f"train/{k}", v, step)
            self.tb.flush()

    def log_eval(self, step: int, metrics: dict) -> None:
        """Evaluation results: into metrics.jsonl as their own row (keys already prefixed 'eval/')."""
        self._write({"step": step, **{k: _clean(v) for k, v in metrics.items()}}, step)

    def _flush_completions(self) -> None:
        if not self.completions:
            return
        with open(self.dir / "completions.jsonl", "a") as f:
            for rec in self.completions:
                f.write(json.dumps(rec, default=str) + "\n")
        n = self.num_completions_to_print
        for rec in self.completions[: (len(self.completions) if n is None else n)]:
            text = rec["completion"] if isinstance(rec["completion"], str) else rec["completion"][-1]["content"]
            self.write(f"  [step {rec['step']}] adv={rec['advantage']:+.2f} rewards={rec['rewards']} "
                       f"completion={text[:120]!r}")
        self.completions.clear()

    def progress(self, step: int, row: dict | None = None) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        if row and row.get("reward") is not None:
            self.bar.set_postfix_str(f"reward={row['reward']:.3f}", refresh=False)
        self.bar.refresh()

    def write(self, text: str) -> None:
        """Print without breaking the progress bar (main rank only)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    # -- resume / end --------------------------------------------------------------------------------------------
    def restore(self, history: list[dict], start_step: int) -> None:
        """Continue a run: keep the checkpoint's history and rewrite metrics.jsonl from it, dropping rows logged
        after the checkpoint by the interrupted run (they are about to be recomputed)."""
        self.history = [dict(r) for r in history if r["step"] <= start_step]
        if self.enabled:
            with open(self.dir / "metrics.jsonl", "w") as f:
                for r in self.history:
                    f.write(json.dumps(r) + "\n")

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()


def curve_series(history: list[dict], reward_names: list[str]) -> list[tuple[str, list, list, str]]:
    """(label, steps, values, "line" | "points") for reward_curve.png: the train reward (and its trailing mean),
    each reward function's mean unless it equals the total (a weight-0 function would duplicate it), and the
    held-out accuracy as points, one per evaluated step (a line between evaluations far apart reads as a trend)."""
    train = [r for r in history if r.get("reward") is not None]
    out = []
    if train:
        steps = [r["step"] for r in train]
        rewards = [r["reward"] for r in train]
        out.append(("reward (train)", steps, rewards, "line"))
        if len(train) >= 6:  # a trailing mean shows the trend through the per-batch noise
            k = max(3, len(train) // 5)
            smooth = [sum(rewards[max(0, i - k + 1) : i + 1]) / len(rewards[max(0, i - k + 1) : i + 1])
                      for i in range(len(rewards))]
            out.append((f"reward (train, mean of {k} steps)", steps, smooth, "line"))
        if len(reward_names) > 1:
            for name in reward_names:
                values = [r.get(f"rewards/{name}/mean") for r in train]
                same = all(v is not None and abs(v - t) <= 1e-9 for v, t in zip(values, rewards))
                if not same and any(v is not None for v in values):
                    out.append((f"rewards/{name}/mean", steps, values, "line"))
    evals = {r["step"]: r["eval/accuracy"] for r in history if r.get("eval/accuracy") is not None}  # last per step
    if evals:
        out.append(("eval/accuracy (held out)", list(evals), list(evals.values()), "points"))
    return out


def plot_reward_curve(history: list[dict], path: str | os.PathLike, reward_names: list[str]) -> Path | None:
    """Draw curve_series into `path`; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: skipping reward_curve.png (pip install matplotlib)", stacklevel=2)
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, steps, values, kind in curve_series(history, reward_names):
        if kind == "points":
            ax.plot(steps, values, ls="none", marker="s", ms=7, color="k", label=label)
            for step, value in zip(steps, values):
                ax.annotate(f"{value:.1%}", (step, value), textcoords="offset points", xytext=(6, 4), fontsize=8)
        elif label.startswith("rewards/"):
            ax.plot(steps, values, ls="--", lw=1, label=label)
        elif "mean of" in label:
            ax.plot(steps, values, lw=2.5, color="C0", label=label)
        else:
            ax.plot(steps, values, marker="o", lw=1, alpha=0.5, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward / accuracy")
    ax.set_title("GRPO reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
