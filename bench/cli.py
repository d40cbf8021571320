"""`python -m bench {loss,logprobs,step,gpu,report} ...`: plan a sweep, run each implementation in its own worker process,
collect the numbers, print the table and write JSON / Markdown / PNG under bench/results/<device>-<date>/."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Callable

from . import shapes
from .common import RESULTS_DIR, call_worker, detect_device, device_slug, emit_record, git_info, read_task

# ------------------------------------------------------------------------------------------------ workers


def worker_entry() -> None:
    """`python -m bench _worker`: run the task read from stdin with the function that serves its kind."""
    task = read_task()
    if task.get("kind") == "step":
        from .step import run_step_task

        run_step_task(task, emit_record)
    else:
        from .measure import worker_main

        worker_main(task, emit_record)


# ------------------------------------------------------------------------------------------------ the sweep


def run_suite(
    mode: str,
    cases: list[shapes.Case],
    impl_names: list[str],
    opts: dict,
    device: str,
    timing: dict,
    in_process: bool = False,
    check: bool = True,
    seed: int = 0,
    threads: int | None = None,
    worker_timeout_s: float | None = None,
    progress: bool = True,
    on_job_done: Callable[[dict], None] | None = None,
) -> dict:
    """Measure every (implementation, case); returns {'env': ..., 'records': [...]}, one record per pair.
    `on_job_done`, when given, gets {'env', 'records'} so far after each worker (to save partial results)."""
    from .measure import reset_peak_rss, worker_main

    dtypes = sorted({c.dtype for c in cases})
    env: dict = {}
    rc, tail = call_worker(
        {"kind": "env", "device": device, "dtypes": dtypes, "threads": threads, "gemm_budget_s": timing.get("gemm_budget_s", 1.0)},
        lambda r: env.update(r["env"]),
        in_process,
        worker_timeout_s,
        body=worker_main,
    )
    if rc != 0 or not env:
        # not fatal: the implementations can still be measured, only the GEMM ceiling (roofline) is missing
        print(f"bench: the environment probe failed (exit {rc}); going on without it:\n{tail}", file=sys.stderr)
        env = {"device_type": device.split(":")[0], "probe_error": f"exit {rc}: {tail.strip()[-500:]}", "gemm": {}}

    # Peak RSS is per process: one process per implementation if the peak can be reset between cases,
    # else one per (implementation, case).
    per_case = device == "cpu" and not in_process and not reset_peak_rss()
    jobs = [(n, [c]) for n in impl_names for c in cases] if per_case else [(n, cases) for n in impl_names]
    records: list[dict] = []
    bar = _Progress(len(impl_names) * len(cases), enabled=progress)
    try:
        for name, job_cases in jobs:
            got: list[dict] = []
            bar.describe(f"{name}")

            def on_record(rec, got=got):
                got.append(rec)
                bar.advance(rec)

            task = {
                "kind": "impl",
                "impl": name,
                "cases": [c.to_dict() for c in job_cases],
                "opts": opts,
                "device": device,
                "timing": timing,
                "check": check,
                "seed": seed,
                "threads": threads,
            }
            rc, tail = call_worker(task, on_record, in_process, worker_timeout_s, body=worker_main)
            done = {r["case"]["key"] for r in got}
            for c in job_cases:
                if c.key not in done:
                    why = "killed (out of memory?)" if rc in (-9, 137) else f"exited with code {rc}"
                    rec = {"impl": name, "case": c.to_dict(), "status": "crashed", "error": f"worker {why}: {tail.strip()[-500:]}"}
                    got.append(rec)
                    bar.advance(rec)
            records.extend(got)
            if on_job_done is not None:
                on_job_done({"env": env, "records": list(records)})
    finally:
        bar.close()
    return {"env": env, "records": records}


class _Progress:
    """A rich progress bar on stderr when rich is installed and enabled; silent otherwise."""

    def __init__(self, total: int, enabled: bool = True):
        self._p = None
        if not enabled:
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:
            return
        self._p = Progress(
            TextColumn("[bold]{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[last]}"),
            transient=True,
        )
        self._t = self._p.add_task("starting", total=total, last="")
        self._p.start()

    def describe(self, text: str) -> None:
        if self._p:
            self._p.update(self._t, description=text)

    def advance(self, rec: dict) -> None:
        if self._p:
            c = rec["case"]
            t = rec.get("time", {}).get("median_ms")
            last = f"N={c['tokens']} {c['dtype']}: " + (f"{t:.1f} ms" if t is not None else rec.get("status", "?"))
            self._p.update(self._t, advance=1, last=last)

    def close(self) -> None:
        if self._p:
            self._p.stop()


# ------------------------------------------------------------------------------------------------ argparse


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="llama3-8b", help=f"comma list of {', '.join(shapes.PRESETS)} or HxV (default llama3-8b)")
    p.add_argument("--tokens", default="1024,4096,16384", help="comma list of token counts N = batch*seq_len (1k = 1024)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024; N is rounded down to whole sequences)")
    p.add_argument("--dtype", default=None, help="comma list of bf16,fp16,fp32 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--impls", default="default", help="'all', 'default' (all but torch-compile on CPU) or a comma list")
    p.add_argument("--pad-frac", default="0", help="comma list: fraction of padding tokens")
    p.add_argument("--zero-adv-frac", default="0", help="comma list: fraction of sequences with zero advantage (use with beta=0)")
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--beta", type=float, default=0.0, help="KL weight; != 0 adds reference log-probs")
    p.add_argument("--epsilon-low", type=float, default=0.2)
    p.add_argument("--epsilon-high", type=float, default=0.2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--importance-sampling-level", default="token", choices=["token", "sequence"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"], help="grpo_kernels backend for the ours-* implementations")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--quick", action="store_true", help="CPU-sized run: preset quick, N=1k,2k,4k, fp32 (measured on 2 cores: about 25 s for the default implementations on a quiet machine; 6.5 min for three of them at load average 5.8)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed reps per measurement (default 1 on CPU, 2 on GPU)")
    p.add_argument("--min-reps", type=int, default=None)
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing, after the first call and the memory call (default 0 on CPU, 2 on GPU)")
    p.add_argument("--no-check", action="store_true", help="skip the float64 correctness gate (not recommended)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory run")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-markdown", action="store_true", help="write only the JSON (python -m bench report renders it later)")
    p.add_argument("--save-partial", action="store_true", help="rewrite the JSON after each implementation (complete=false until the end)")
    p.add_argument("--in-process", action="store_true", help="run implementations in this process (CPU memory then shares one process)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-timeout", type=float, default=3600.0, help="seconds before one implementation's worker is killed")
    p.add_argument("--out", default=None, help="output directory (default bench/results/<device>-<date> inside this clone: untracked files until committed)")
    p.add_argument("--tag", default=None, help="file-name stem (default <mode>-<presets>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for mode, text in (
        ("loss", "GRPO loss forward+backward: hidden, LM head -> loss, dH, dW"),
        ("logprobs", "forward-only per-token log-probs (old / reference log-probs)"),
    ):
        _add_sweep_args(sub.add_parser(mode, help=text, description=text))
    from . import step

    step.add_args(sub.add_parser("step", help="one GRPO training step of the bundled trainer vs TRL", description=step.__doc__))
    from . import gpu

    gpu.add_args(sub.add_parser("gpu", help="everything a lent GPU should measure, in one call (<= 9.5 min)", description=gpu.__doc__))
    rp = sub.add_parser("report", help="re-render the table, Markdown and plots of a saved results JSON")
    rp.add_argument("json", nargs="+", help="bench/results/<device>-<date>/<tag>.json")
    rp.add_argument("--no-plots", action="store_true")
    return parser


def sweep_config(args: argparse.Namespace, device: str) -> tuple[list[shapes.Case], dict, dict]:
    if args.quick:
        presets, tokens, seq_len = shapes.QUICK["preset"], shapes.QUICK["tokens"], shapes.QUICK["seq_len"]
        dtypes = shapes.parse_dtypes(args.dtype) if args.dtype else shapes.QUICK["dtype"]
    else:
        presets = [p.strip() for p in args.preset.split(",") if p.strip()]
        tokens = shapes.parse_tokens(args.tokens)
        seq_len = args.seq_len
        dtypes = shapes.parse_dtypes(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    for p in presets:
        shapes.resolve_preset(p)
    cases = shapes.make_cases(
        args.command,
        presets,
        tokens,
        seq_len,
        dtypes,
        shapes.parse_floats(args.pad_frac, "--pad-frac"),
        shapes.parse_floats(args.zero_adv_frac, "--zero-adv-frac"),
    )
    opts = {
        "beta": args.beta,
        "epsilon_low": args.epsilon_low,
        "epsilon_high": args.epsilon_high,
        "loss_type": args.loss_type,
        "temperature": args.temperature,
        "importance_sampling_level": args.importance_sampling_level,
    }
    if args.backend != "auto":
        opts["backend"] = args.backend
    if args.loss_type == "dr_grpo":
        opts["max_completion_length"] = seq_len
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")
    gpu = device.startswith("cuda")
    timing = {
        "budget_s": args.budget if args.budget is not None else (2.0 if gpu else (0.5 if args.quick else 1.0)),
        "min_reps": args.min_reps if args.min_reps is not None else (10 if gpu else 3),
        "max_reps": args.max_reps,
        "warmup": args.warmup if args.warmup is not None else (2 if gpu else 0),
        "memory": not args.no_memory,
        "gemm_budget_s": 1.0 if gpu else 0.5,
    }
    return cases, opts, timing


def run_sweep(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    from . import report
    from .impls import resolve_impls

    device = detect_device(args.device)
    import torch

    cases, opts, timing = sweep_config(args, device)
    impl_names = resolve_impls(args.impls, args.command, torch.device(device))
    argv = sys.argv[1:] if argv is None else argv
    started = _dt.datetime.now(_dt.timezone.utc)
    tag = args.tag or f"{args.command}-{'_'.join(sorted({c.preset for c in cases}))}"

    def meta(complete: bool) -> dict:
        return {
            "mode": args.command,
            "command": "python -m bench " + " ".join(argv),
            "args": vars(args),
            "quick": bool(args.quick),
            "impls": impl_names,
            "opts": opts,
            "timing": timing,
            "device": device,
            "date": started.isoformat(timespec="seconds"),
            "duration_s": (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(),
            "complete": complete,
            **git_info(),
        }

    def out_dir(env: dict) -> Path:
        return Path(args.out) if args.out else RESULTS_DIR / f"{device_slug(env)}-{started.date().isoformat()}"

    def save_partial(part: dict) -> None:
        # after each implementation: a run killed at a time limit still leaves what it measured
        part = report.finalize({**part, "meta": meta(False)})
        report.write_all(part, out_dir(part["env"]), tag, plots=False, markdown=False)

    res = run_suite(
        args.command,
        cases,
        impl_names,
        opts,
        device,
        timing,
        in_process=args.in_process,
        check=not args.no_check,
        seed=args.seed,
        threads=args.threads,
        worker_timeout_s=args.worker_timeout,
        progress=not args.quiet,
        on_job_done=save_partial if args.save_partial else None,
    )
    res["meta"] = meta(True)
    res = report.finalize(res)
    paths = report.write_all(res, out_dir(res["env"]), tag, plots=not args.no_plots, markdown=not args.no_markdown)
    report.print_table(res)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        worker_entry()
        return 0
    if argv[:1] == ["_gpu_hardening"]:
        from .hardening import main as hardening_main

        return hardening_main()
    if argv[:1] == ["_gpu_env"] and len(argv) == 2:
        from .gpu import env_main

        env_main(argv[1])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "gpu":
            from . import gpu

            return gpu.main(args)
        if args.command == "step":
            from . import step

            step.main(args)
        elif args.command == "report":
            from . import report

            for path in args.json:
                paths = report.rerender(Path(path), plots=not args.no_plots)
                print("wrote " + ", ".join(str(p) for p in paths))
        else:
            run_sweep(args, argv)
    except ValueError as exc:
        parser.error(str(exc))
    return 0
