"""One GRPO training step end to end: the bundled trainer (grpo.GRPOTrainer, fused loss) against TRL's
GRPOTrainer (`trl`) and TRL's GRPOTrainer with our kernels patched in (`trl+gk`:
grpo_kernels.integrations.trl.patch() before the trainer is built, unpatch() after), on the same model, data
and config, with time and peak memory split into generation / scoring / update.

Times: ours from the trainer's logged time/generation, time/scoring, time/update and step_time metrics; TRL
(which logs no such split) from wrappers around its _generate and _calculate_rewards and a step callback, its
update being the step's remainder (old/ref log-probs, loss, backward, optimizer), as ours counts it.
Memory: ours through the trainer's phase callbacks (grpo/callbacks.py), TRL's through the same wrappers; the
peak above the phase's starting point, per phase (GPU: max_memory_allocated; CPU: peak RSS reset at
each phase start), plus the whole process's peak. Each variant runs in its own worker process.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

PHASES = ("generation", "scoring", "update")
VARIANTS = ("ours-auto", "ours-chunked", "ours-fused", "ours+vllm", "trl", "trl+gk", "trl+vllm")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="tiny (seeded 2-layer Llama), smollm2 (SmolLM2-135M-Instruct) or a local path")
    p.add_argument("--impls", default="ours-auto,trl,trl+gk", help=f"comma list of {', '.join(VARIANTS)} (trl+gk: TRL's "
                   "GRPOTrainer after grpo_kernels.integrations.trl.patch(); +vllm: use_vllm=True, colocate)")
    p.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    p.add_argument("--warmup-steps", type=int, default=1, help="steps run first and not counted")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="per_device_train_batch_size (completions)")
    p.add_argument("--max-completion-length", type=int, default=16)
    p.add_argument("--max-prompt-length", type=int, default=128)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (--quick: 1; a tiny model's small ops "
                   "on 2 threads stall at every barrier when the machine is shared)")
    p.add_argument("--in-process", action="store_true")
    p.add_argument("--worker-timeout", type=float, default=3600.0)
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 warm-up + 3 measured steps")


# ------------------------------------------------------------------------------------------------ memory per phase


class PhaseMeter:
    """Exclusive wall time and peak extra memory of named phases. Phases may nest (TRL generates inside its
    training_step): entering an inner phase pauses the outer one, so each phase counts only its own work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self._stack: list[dict] = []

    # current usage and the peak since the last reset, in bytes (None when the peak cannot be reset)
    def _usage(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        from .measure import _proc_status_kib

        kib = _proc_status_kib("VmRSS")
        return None if kib is None else kib * 1024

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from .measure import reset_peak_rss

            reset_peak_rss()

    def _peak_since_reset(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        from .measure import _proc_status_kib

        kib = _proc_status_kib("VmHWM")
        return None if kib is None else kib * 1024

    def _pause(self, frame: dict) -> None:
        peak = self._peak_since_reset()
        if peak is not None and frame["base"] is not None:
            frame["peak"] = max(frame["peak"], peak - frame["base"])
        frame["seconds"] += time.perf_counter() - frame["t"]

    def _resume(self, frame: dict) -> None:
        self._reset_peak()
        frame["t"] = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        if self._stack:
            self._pause(self._stack[-1])
        frame = {"name": name, "base": self._usage(), "peak": 0, "seconds": 0.0}
        self._stack.append(frame)
        self._resume(frame)
        try:
            yield
        finally:
            self._pause(frame)
            self._stack.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + frame["seconds"]
            if frame["base"] is not None:
                self.peak[name] = max(self.peak.get(name, 0), frame["peak"])
            if self._stack:
                self._resume(self._stack[-1])

    def wrap(self, name: str, fn):
        def wrapped(*a, **k):
            with self.phase(name):
                return fn(*a, **k)

        return wrapped


def _process_peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------ data


def _rows(n: int, seed: int) -> list[dict]:
    from grpo.data import make_arithmetic_problems, to_prompt_rows

    return to_prompt_rows(make_arithmetic_problems(n, seed))


def _rewards():
    from grpo import format_reward, gsm8k_reward

    return [gsm8k_reward, format_reward]


def _summarise(per_step: list[dict]) -> dict:
    out = {}
    for key in ("step", *PHASES, "weight_sync"):
        vals = [s[key] for s in per_step if s.get(key) is not None]
        out[f"{key}_s"] = statistics.median(vals) if vals else None
    return out


# ------------------------------------------------------------------------------------------------ variants


def _shared_args(task: dict, output_dir: str) -> dict:
    """The config both trainers get, under the field names they share (ours are TRL's)."""
    c = task["config"]
    return dict(output_dir=output_dir, num_generations=c["num_generations"], per_device_train_batch_size=c["batch_size"],
                max_completion_length=c["max_completion_length"], beta=c["beta"], loss_type=c["loss_type"],
                learning_rate=c["learning_rate"], lr_scheduler_type="constant",
                max_steps=task["warmup_steps"] + task["steps"], logging_steps=1, report_to="none", seed=task["seed"])


class PhaseMeterCallback:
    """GRPOTrainer's phase events (grpo/callbacks.py) into a PhaseMeter. The old/reference log-probs ("logprobs")
    count as update, as the trainer's time/update counts them."""

    NAMES = {"generation": "generation", "scoring": "scoring", "logprobs": "update", "update": "update"}

    def __init__(self, meter: PhaseMeter):
        self.meter = meter
        self._open: list = []

    def on_phase_begin(self, args, state, control, phase: str, **kwargs) -> None:
        ctx = self.meter.phase(self.NAMES[phase])
        ctx.__enter__()
        self._open.append(ctx)

    def on_phase_end(self, args, state, control, phase: str, **kwargs) -> None:
        self._open.pop().__exit__(None, None, None)


def _run_ours(task: dict, device: torch.device) -> dict:
    from grpo import GRPOConfig, GRPOTrainer

    c = task["config"]
    variant = task["variant"]
    strategy = variant.split("-", 1)[1] if "-" in variant else "auto"
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(**_shared_args(task, tmp), max_prompt_length=c["max_prompt_length"], save_steps=10**9,
                          disable_progress_bar=True, kernel_strategy=strategy, use_vllm=variant.endswith("+vllm"))
        meter = PhaseMeter(device)
        t0 = time.perf_counter()
        trainer = GRPOTrainer(model=task["model"], reward_funcs=_rewards(), args=args,
                              train_dataset=_rows(64, task["seed"]), callbacks=[PhaseMeterCallback(meter)])
        setup_s = time.perf_counter() - t0  # model load (+ vLLM engine start)
        history = trainer.train()
    rows = [r for r in history if "step_time" in r]
    per_step = [
        {"step": r["step_time"], **{p: r.get(f"time/{p}") for p in PHASES}, "weight_sync": r.get("time/weight_sync"),
         "reward": r.get("reward"), "mismatch_fraction": r.get("sampling/mismatch_fraction")}
        for r in rows[task["warmup_steps"] :]
    ]
    return {"per_step": per_step, "peak_extra_bytes": meter.peak, "process_peak_bytes": _process_peak(device),
            "setup_s": setup_s}


def _trl_unavailable() -> str | None:
    import importlib.util

    for mod in ("trl", "datasets"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install trl)"
    return None


def _run_trl(task: dict, device: torch.device) -> dict:
    import dataclasses

    import datasets
    import trl
    from transformers import TrainerCallback

    from grpo.model import load_model

    c = task["config"]
    model, tokenizer = load_model(task["model"], seed=task["seed"])
    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    meter = PhaseMeter(device)
    steps: list[dict] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            self.before = dict(meter.seconds)

        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total = time.perf_counter() - self.t0
            phase = {p: meter.seconds.get(p, 0.0) - self.before.get(p, 0.0) for p in ("generation", "scoring")}
            steps.append({"step": total, **phase, "update": total - sum(phase.values())})

    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(**_shared_args(task, tmp), save_strategy="no", disable_tqdm=True, use_cpu=device.type == "cpu",
                  bf16=device.type == "cuda")
        if task["variant"] == "trl+vllm":
            if device.type == "cpu":  # as ours: a KV cache of 1 GiB, not 30% of the machine; no OpenMP binding
                os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            kw.update(use_vllm=True, vllm_mode="colocate")
        if "max_prompt_length" in fields:
            kw["max_prompt_length"] = c["max_prompt_length"]
        args = trl.GRPOConfig(**{k: v for k, v in kw.items() if k in fields})
        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=_rewards(),
            args=args,
            train_dataset=datasets.Dataset.from_list(_rows(64, task["seed"])),
            processing_class=tokenizer,
            callbacks=[StepClock()],
        )
        # TRL's trainer is third-party and has no phase events: its private methods are wrapped, on this instance only.
        trainer._generate = meter.wrap("generation", trainer._generate)
        trainer._calculate_rewards = meter.wrap("scoring", trainer._calculate_rewards)
        trainer.training_step = meter.wrap("update", trainer.training_step)
        trainer.train()
    return {"per_step": steps[task["warmup_steps"] :], "peak_extra_bytes": meter.peak, "process_peak_bytes": _process_peak(device)}


def _gk_trl_integration():
    """(module, None) for grpo_kernels.integrations.trl, or (None, why it is unavailable)."""
    try:
        from grpo_kernels.integrations import trl as gkt
    except ModuleNotFoundError as exc:
        if exc.name in ("grpo_kernels.integrations", "grpo_kernels.integrations.trl"):
            return None, "grpo_kernels.integrations.trl not found"
        return None, f"import grpo_kernels.integrations.trl failed: {exc}"
    except Exception as exc:
        return None, f"import grpo_kernels.integrations.trl failed: {type(exc).__name__}: {exc}"[:300]
    return gkt, None


def run_step_task(task: dict, emit) -> None:
    device = torch.device(task["device"])
    if task.get("threads"):
        torch.set_num_threads(int(task["threads"]))
    rec = {"variant": task["variant"], "model": task["model"], "config": task["config"], "threads": torch.get_num_threads()}
    try:
        if task["variant"] in ("trl", "trl+gk", "trl+vllm"):
            reason = _trl_unavailable()
            gkt = None
            if reason is None and task["variant"] == "trl+gk":
                gkt, reason = _gk_trl_integration()
            if reason:
                emit({**rec, "status": "unavailable", "error": reason})
                return
            if gkt is None:
                out = _run_trl(task, device)
            else:
                # only this variant runs patched: patch before TRL's trainer is built, undo it right after
                gkt.patch()
                try:
                    out = _run_trl(task, device)
                finally:
                    gkt.unpatch()
        else:
            try:
                import grpo.trainer  # noqa: F401
            except Exception as exc:
                emit({**rec, "status": "unavailable", "error": f"grpo.GRPOTrainer is not importable: {exc}"})
                return
            out = _run_ours(task, device)
        rec.update(status="ok", **out, **_summarise(out["per_step"]))
    except Exception as exc:
        rec.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500], traceback=traceback.format_exc()[-3000:])
    emit(rec)


# ------------------------------------------------------------------------------------------------ CLI


def _fmt(v, f="{:.3f}"):
    return "-" if v is None else f.format(v)


def to_markdown(res: dict) -> str:
    meta, env = res["meta"], res["env"]
    lines = [
        "# bench step results",
        "",
        f"{env.get('device_name')} | torch {env.get('torch')} | trl {env.get('trl')} | transformers {env.get('transformers')} | "
        f"git {(meta.get('commit') or 'no commit')[:12]} | {meta.get('date')}",
        "",
        f"Command: `{meta.get('command')}`",
        "",
        f"Model `{meta['model']}`; config: " + ", ".join(f"{k}={v}" for k, v in meta["config"].items())
        + f"; median of {meta['steps']} steps after {meta['warmup_steps']} warm-up.",
        "",
        "| variant | status | step s | generation s | scoring s | update s | weight sync s | setup s | peak gen MiB | peak score MiB | peak update MiB | process peak MiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["records"]:
        pk = r.get("peak_extra_bytes") or {}
        mib = lambda b: None if b is None else b / 2**20  # noqa: E731
        lines.append(
            f"| {r['variant']} | {r['status']} | {_fmt(r.get('step_s'))} | {_fmt(r.get('generation_s'))} | "
            f"{_fmt(r.get('scoring_s'))} | {_fmt(r.get('update_s'))} | {_fmt(r.get('weight_sync_s'))} | "
            f"{_fmt(r.get('setup_s'), '{:.1f}')} | {_fmt(mib(pk.get('generation')), '{:.1f}')} | "
            f"{_fmt(mib(pk.get('scoring')), '{:.1f}')} | {_fmt(mib(pk.get('update')), '{:.1f}')} | "
            f"{_fmt(mib(r.get('process_peak_bytes')), '{:.0f}')} | {(r.get('error') or '').replace('|', '/')[:160]} |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict:
    from .common import RESULTS_DIR, call_worker, detect_device, device_slug, git_info
    from .measure import worker_main

    if args.quick:
        args.model, args.steps, args.warmup_steps = "tiny", 3, 2
        if args.threads is None:
            args.threads = 1
    variants = [v.strip() for v in args.impls.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--impls: unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup_steps < 0:
        raise ValueError("--steps must be >= 1 and --warmup-steps >= 0")
    device = detect_device(args.device)
    config = {
        "num_generations": args.num_generations,
        "batch_size": args.batch_size,
        "max_completion_length": args.max_completion_length,
        "max_prompt_length": args.max_prompt_length,
        "beta": args.beta,
        "loss_type": args.loss_type,
        "learning_rate": args.learning_rate,
    }
    env: dict = {}
    call_worker(
        {"kind": "env", "device": device, "dtypes": [], "threads": args.threads},
        lambda r: env.update(r["env"]),
        args.in_process,
        body=worker_main,
    )
    started = _dt.datetime.now(_dt.timezone.utc)
    records = []
    for v in variants:
        task = {
            "kind": "step", "variant": v, "model": args.model, "config": config, "device": device,
            "steps": args.steps, "warmup_steps": args.warmup_steps, "seed": args.seed, "threads": args.threads,
        }  # fmt: skip
        got: list[dict] = []
        print(f"step: {v} ...", file=sys.stderr, flush=True)
        rc, tail = call_worker(task, got.append, args.in_process, args.worker_timeout, body=run_step_task)
        records += got or [{"variant": v, "model": args.model, "status": "crashed", "error": f"worker exited {rc}: {tail[-400:]}"}]
    res = {
        "meta": {
            "mode": "step", "model": args.model, "config": config, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "device": device, "date": started.isoformat(timespec="seconds"), "command": "python -m bench " + " ".join(sys.argv[1:]),
            **git_info(),
        },
        "env": env,
        "records": records,
    }  # fmt: skip
    out = Path(args.out) if args.out else RESULTS_DIR / f"{device_slug(env)}-{started.date().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"step-{Path(args.model).name}"
    (out / f"{tag}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = to_markdown(res)
    (out / f"{tag}.md").write_text(md)
    print(md)
    print(f"wrote {out / (tag + '.json')}, {out / (tag + '.md')}")
    return res
