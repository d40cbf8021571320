"""`python -m bench gpu`: everything a lent GPU should measure, in one call of at most 9.5 minutes.

The parts run one after another, each as its own process group under a hard time budget: a part that runs
over is killed (its worker processes too) and what it wrote so far is kept (the sweeps rewrite their JSON
after each implementation); a missing optional peer, a failing test or a crashed part never stops the next
one. A progress line is printed when each part starts and ends. The folder `--out` gets at most 8 files
(everything comes back from the GPU machine): summary.md, gpu.log, env.json, gpu-tests.txt and one JSON per
measurement part; the summary is rewritten after every part, so a run cut short still leaves one.
`--dry-run` prints the plan and each part's budget without touching a GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import REPO_ROOT, RESULTS_DIR

MAX_FILES = 8  # what the device tool brings back from $OUT
TOTAL_S = 570  # all parts together: a device call of timeout_s 595 (its limit is 600), within a 15-minute lease
LOG_TAIL = 60_000  # characters of each part's output kept in gpu.log

# Order matters under a budget: the peers the targets need first (the sweep saves after each one).
# ours-chunked:1024 (a fixed 1024-row chunk) against ours-auto (auto sizing: up to 2.5 GiB of chunk): is the
# smaller chunk as fast? On the H200 the cap made the loss keep 3.0 GiB and log-probs 3.9 GiB against TRL's 2.4 / 0.4.
LOSS_IMPLS = "ours-auto,torch,trl,liger,liger-triton,cce,ours-fused,ours-chunked:1024"
LOGPROBS_IMPLS = "ours-auto,torch,trl,liger,liger-triton,cce,ours-chunked:1024"
STEP_VARIANTS = "ours-auto,trl,trl+gk"
SWEEP_FLAGS = ("--preset", "llama3-8b", "--dtype", "bf16", "--budget", "1", "--no-plots", "--no-markdown",
               "--save-partial", "--quiet", "--device", "cuda")  # fmt: skip


@dataclass(frozen=True)
class Part:
    """One step of the plan: `python <argv>` in the repo root ("{scratch}" is the part's scratch folder).
    `result` is the file the part leaves in scratch (copied to --out); `capture`, when set, is the name under
    which the part's own output is copied to --out as well; `inline` puts the part's PASS / FAIL / INFO lines into
    summary.md instead of a file of their own (the files that come back are limited)."""

    name: str
    budget_s: float
    what: str
    argv: tuple[str, ...]
    result: str | None = None
    capture: str | None = None
    inline: bool = False


@dataclass
class Outcome:
    name: str
    budget_s: float
    status: str = "pending"  # ok | failed (exit code) | timeout | skipped | error | interrupted
    seconds: float | None = None
    rc: int | None = None
    note: str = ""
    files: list[str] = field(default_factory=list)


def plan(pytest_timeout: bool | None = None) -> list[Part]:
    """The parts, their budgets (TOTAL_S in all) and commands. Budgets: what each part took on an H200 on
    2026-12-04 (bench/results/h200-2026-12-04), plus a margin (the GPU tests took about 165 s there in two pytest
    calls; pytest runs verbose, so a part cut at its budget still shows each test's outcome so far)."""
    if pytest_timeout is None:
        pytest_timeout = importlib.util.find_spec("pytest_timeout") is not None
    tests = ["-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-o", "addopts=-ra", "--continue-on-collection-errors"]
    if pytest_timeout:
        tests += ["--timeout", "60"]
    return [
        Part("env", 25, "GPU, driver, torch, triton, CUDA, clocks; which optional peers import",
             ("-m", "bench", "_gpu_env", "{scratch}/env.json"), result="env.json"),
        Part("gpu-tests", 195, "pytest -m gpu (each test at most 60 s where pytest-timeout is installed)",
             (*tests, "tests"), capture="gpu-tests.txt"),
        Part("hardening", 25, "GPU-hardening findings on the device: fp32-output GEMM probe, autocast, NaN rule, a "
             "launch of every kernel configuration this architecture gets, sizing under a fragmented allocator",
             ("-m", "bench", "_gpu_hardening"), inline=True),
        Part("loss-8k", 135, "loss fwd+bwd, llama3-8b bf16, N=8192, zero-advantage 0 and 0.5, every implementation",
             ("-m", "bench", "loss", *SWEEP_FLAGS, "--tokens", "8192", "--zero-adv-frac", "0,0.5", "--impls", LOSS_IMPLS,
              "--worker-timeout", "70", "--out", "{scratch}", "--tag", "loss-llama3-8b-n8k"),
             result="loss-llama3-8b-n8k.json"),
        Part("loss-64k", 55, "loss fwd+bwd, llama3-8b bf16, N=65536: ours (memory; fused against its 8NHV floor)",
             ("-m", "bench", "loss", *SWEEP_FLAGS, "--tokens", "65536", "--impls", "ours-auto,ours-fused,ours-chunked",
              "--worker-timeout", "45", "--out", "{scratch}", "--tag", "loss-llama3-8b-n64k"),
             result="loss-llama3-8b-n64k.json"),
        Part("logprobs-16k", 65, "forward-only log-probs, llama3-8b bf16, N=16384",
             ("-m", "bench", "logprobs", *SWEEP_FLAGS, "--tokens", "16384", "--impls", LOGPROBS_IMPLS,
              "--worker-timeout", "35", "--out", "{scratch}", "--tag", "logprobs-llama3-8b-n16k"),
             result="logprobs-llama3-8b-n16k.json"),
        Part("step", 70, "one GRPO step of the bundled trainer on CUDA (bf16, tiny 2-layer Llama) vs TRL, TRL+gk",
             ("-m", "bench", "step", "--model", "tiny", "--device", "cuda", "--impls", STEP_VARIANTS, "--steps", "2",
              "--warmup-steps", "1", "--worker-timeout", "60", "--out", "{scratch}", "--tag", "step-tiny"),
             result="step-tiny.json"),
    ]  # fmt: skip


def files_of(parts: list[Part]) -> list[str]:
    names = ["summary.md", "gpu.log"]
    for p in parts:
        names += [n for n in (p.result, p.capture) if n]
    return names


def format_plan(parts: list[Part], total_s: float) -> str:
    lines = [f"python -m bench gpu: {len(parts)} parts, at most {total_s / 60:.2f} min in all "
             f"(budgets sum to {sum(p.budget_s for p in parts) / 60:.2f} min)", ""]  # fmt: skip
    for i, p in enumerate(parts, 1):
        lines.append(f"{i}. {p.name:<13} {p.budget_s / 60:5.2f} min  {p.what}")
        lines.append(f"   python {' '.join(shlex.quote(a) for a in p.argv)}")
    lines += ["", "files: " + ", ".join(files_of(parts))]
    peers = {m: importlib.util.find_spec(m) is not None for m in ("trl", "datasets", "liger_kernel", "cut_cross_entropy")}
    lines.append("optional peers here: " + ", ".join(f"{m} {'found' if ok else 'not installed'}" for m, ok in peers.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ running


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's whole process group, SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(part: Part, scratch: Path, log_path: Path, budget_s: float) -> Outcome:
    """Run one part in its own session under `budget_s` seconds; its output goes to `log_path`."""
    out = Outcome(part.name, budget_s)
    argv = [sys.executable, *(a.replace("{scratch}", str(scratch)) for a in part.argv)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    t0 = time.monotonic()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, cwd=str(REPO_ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
            try:
                out.rc = proc.wait(timeout=max(budget_s, 0.1))
                out.status = "ok" if out.rc == 0 else "failed"
                if out.rc != 0:
                    out.note = f"exit code {out.rc}"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                out.status, out.rc = "timeout", proc.returncode
                out.note = f"killed at its budget of {budget_s:.0f} s; what it wrote is kept"
            finally:
                if proc.poll() is None:
                    _kill_group(proc)
    except OSError as exc:
        out.status, out.note = "error", f"could not start: {exc}"
    out.seconds = time.monotonic() - t0
    return out


class Runner:
    """Runs the parts, keeps --out up to date after each one (result files, gpu.log, summary.md)."""

    def __init__(self, parts: list[Part], out: Path | None, total_s: float, meta: dict, echo=print):
        self.parts, self.out, self.total_s, self.meta, self.echo = parts, out, total_s, meta, echo
        self.scratch = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
        self.log_lines: list[str] = []
        self.inline: dict[str, str] = {}  # part name -> its output, for the summary
        self.outcomes = [Outcome(p.name, p.budget_s) for p in parts]

    def say(self, line: str) -> None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")
        self.log_lines.append(f"[{stamp}] {line}")
        self.echo(f"[bench gpu {stamp}] {line}", flush=True)

    def run(self) -> list[Outcome]:
        t_start = time.monotonic()
        try:
            for i, (part, oc) in enumerate(zip(self.parts, self.outcomes), 1):
                left = self.total_s - (time.monotonic() - t_start)
                budget = min(part.budget_s, left)
                if budget < min(5.0, part.budget_s):  # too little of the total left to start it
                    oc.status, oc.note = "skipped", "no time left in the total budget"
                    self.say(f"part {i}/{len(self.parts)} {part.name}: skipped (total budget spent)")
                    continue
                self.say(f"part {i}/{len(self.parts)} {part.name}: started, budget {budget / 60:.2f} min - {part.what}")
                part_log = self.scratch / f"{part.name}.log"
                try:
                    done = run_part(part, self.scratch, part_log, budget)
                except BaseException:  # SIGTERM / Ctrl-C of the whole command: the part's group is already killed
                    oc.status, oc.note = "interrupted", "the bench gpu command itself was stopped"
                    self._collect(part, oc, part_log)
                    raise
                oc.__dict__.update(done.__dict__)
                self._collect(part, oc, part_log)
                self.say(f"part {i}/{len(self.parts)} {part.name}: {oc.status.upper()} in {oc.seconds:.0f} s"
                         + (f" ({oc.note})" if oc.note else "") + (f"; wrote {', '.join(oc.files)}" if oc.files else ""))
                self.sync()
        finally:
            self.sync()
        return self.outcomes

    def _collect(self, part: Part, oc: Outcome, part_log: Path) -> None:
        text = part_log.read_text(errors="replace") if part_log.exists() else ""
        self.log_lines.append(f"----- {part.name} output (last {LOG_TAIL} characters) -----")
        self.log_lines.append(text[-LOG_TAIL:])
        if part.inline:
            self.inline[part.name] = text + (f"\n[bench gpu] {oc.status}: {oc.note}\n" if oc.note else "")
        if part.capture:
            (self.scratch / part.capture).write_text(text + (f"\n[bench gpu] {oc.status}: {oc.note}\n" if oc.note else ""))
            oc.files.append(part.capture)
        if part.result and (self.scratch / part.result).exists():
            oc.files.append(part.result)
            if part.name == "env" and self.out is None:
                self.out = default_out(self.scratch / part.result)

    def sync(self) -> None:
        """Copy the result files, gpu.log and a fresh summary.md into --out (never more than MAX_FILES). Never
        raises: a summary that cannot be rendered is replaced by the error, the raw files still land."""
        import traceback

        if self.out is None:
            self.out = default_out(None)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            for n in dict.fromkeys(n for oc in self.outcomes for n in oc.files):
                shutil.copyfile(self.scratch / n, self.out / n)
            (self.out / "gpu.log").write_text("\n".join(self.log_lines) + "\n")
        except OSError as exc:
            self.echo(f"[bench gpu] could not write into {self.out}: {exc}", flush=True)
            return
        try:
            results = load_results(self.scratch, self.parts)
            results.update({name: {"text": text, "inline": True} for name, text in self.inline.items()})
            text = render_summary(self.meta, self.outcomes, results)
        except Exception:
            text = "# python -m bench gpu\n\nThe summary could not be rendered:\n\n```\n" + traceback.format_exc() + "```\n"
        (self.out / "summary.md").write_text(text)


def default_out(env_json: Path | None) -> Path:
    """bench/results/<device>-<date>/gpu in this clone (untracked until committed)."""
    slug = "cuda"
    if env_json is not None:
        try:
            name = json.loads(env_json.read_text()).get("device_name") or "cuda"
            slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-").replace("--", "-")
        except (OSError, ValueError):
            pass
    return RESULTS_DIR / f"{slug}-{_dt.date.today().isoformat()}" / "gpu"


def load_results(folder: Path, parts: list[Part]) -> dict:
    res = {}
    for p in parts:
        if p.result and p.result.endswith(".json") and (folder / p.result).exists():
            try:
                res[p.name] = json.loads((folder / p.result).read_text())
            except ValueError as exc:
                res[p.name] = {"error": f"unreadable JSON: {exc}"}
        if p.capture and (folder / p.capture).exists():
            res[p.name] = {"text": (folder / p.capture).read_text(errors="replace")}
    return res


# ------------------------------------------------------------------------------------------------ summary


def _demote(md: str, levels: int = 2) -> str:
    return "\n".join(("#" * levels + line) if line.startswith("#") else line for line in md.splitlines())


def _pytest_tail(text: str) -> str:
    """pytest's final counts; for a run cut short, the counts of its verbose PASSED / FAILED / ERROR lines so
    far and the failing tests' names."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if any(w in ln for w in (" passed", " failed", " error", " skipped", "no tests ran", "deselected")):
            return ln.strip("= ")
    outcome = {w: [ln.split(" ")[0] for ln in lines if "::" in ln and f" {w}" in ln]
               for w in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    if any(outcome.values()):
        counts = ", ".join(f"{len(v)} {w.lower()}" for w, v in outcome.items() if v)
        bad = outcome["FAILED"] + outcome["ERROR"]
        return f"cut short after {counts}" + (f": {' '.join(bad[:5])}" if bad else "")
    return lines[-1] if lines else "(no output)"


def combined_loss(results: dict) -> dict | None:
    """The loss sweeps' records together (env of the N=8192 run), for the targets."""
    runs = [results[k] for k in ("loss-8k", "loss-64k") if isinstance(results.get(k), dict) and "records" in results[k]]
    if not runs:
        return None
    return {"env": runs[0].get("env", {}), "records": [r for run in runs for r in run["records"]]}


def render_summary(meta: dict, outcomes: list[Outcome], results: dict) -> str:
    """Markdown: environment, the parts (budget, status), targets met / not met, then each part's tables."""
    from . import report

    env = (results.get("env") or {}) if isinstance(results.get("env"), dict) else {}
    lines = ["# python -m bench gpu", ""]
    lines.append(f"Commit: `{meta.get('commit') or 'unknown'}`" + (" (dirty tree)" if meta.get("dirty") else "")
                 + f" | started {meta.get('date')} | command `{meta.get('command')}`")  # fmt: skip
    lines += ["", "## Environment", ""]
    if env:
        for key in ("device_name", "capability", "sm_count", "memory_gib", "driver", "cuda", "torch", "triton",
                    "transformers", "python", "clocks"):  # fmt: skip
            if env.get(key) is not None:
                lines.append(f"- {key}: {env[key]}")
        imports = env.get("imports") or {}
        if imports:
            lines.append("- imports: " + "; ".join(f"{m}: {v}" for m, v in imports.items()))
    else:
        lines.append("- (the env part left no env.json)")
    lines += ["", "## Parts", "", "| part | budget min | status | seconds | files | note |", "|---|---|---|---|---|---|"]
    for oc in outcomes:
        secs = "-" if oc.seconds is None else f"{oc.seconds:.0f}"
        note = oc.note.replace("|", "/")
        if oc.name == "gpu-tests" and isinstance(results.get("gpu-tests"), dict) and "text" in results["gpu-tests"]:
            note = (note + "; " if note else "") + _pytest_tail(results["gpu-tests"]["text"]).replace("|", "/")
        lines.append(f"| {oc.name} | {oc.budget_s / 60:.2f} | {oc.status} | {secs} | {', '.join(oc.files) or '-'} | {note} |")
    hard = results.get("hardening")
    if isinstance(hard, dict) and "text" in hard:
        checks = [ln for ln in hard["text"].splitlines() if ln.startswith(("PASS", "FAIL", "INFO", "hardening:"))]
        lines += ["", "## GPU-hardening checks", "", "```", *(checks or ["(no check line: see gpu.log)"]), "```"]
    loss = combined_loss(results)
    lines += ["", "## Targets (H100, bf16, N=8192, H=4096, V=128256, dapo, beta 0; shown, never asserted)", ""]
    targets = report.gpu_targets(loss) if loss else []
    if not targets:
        lines.append("No loss results: no target could be checked.")
    else:
        lines += ["| target | impl | measured | met | note |", "|---|---|---|---|---|"]
        for t in targets:
            met = "-" if t["met"] is None else ("met" if t["met"] else "**not met**")
            lines.append(f"| {t['target']} | {t['impl']} | {t['measured'] or '-'} | {met} | {t['note']} |")
    for name, title in (("loss-8k", "Loss, N=8192"), ("loss-64k", "Loss, N=65536"), ("logprobs-16k", "Log-probs, N=16384")):
        res = results.get(name)
        if not isinstance(res, dict) or "records" not in res:
            continue
        lines += ["", f"## {title}" + ("" if (res.get("meta") or {}).get("complete", True) else " (partial: the part was cut short)"), ""]
        lines.append(_demote(report.to_markdown(report.finalize(res))))
    step = results.get("step")
    if isinstance(step, dict) and "records" in step:
        from .step import to_markdown as step_markdown

        lines += ["", "## One GRPO step", "", _demote(step_markdown(step))]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ env part


IMPORT_PROBES = ("grpo_kernels", "grpo", "triton", "transformers", "accelerate", "datasets", "trl", "trl.kernels",
                 "trl.trainer.utils", "liger_kernel", "liger_kernel.chunked_loss", "cut_cross_entropy",
                 "grpo_kernels.integrations.trl", "pytest_timeout")  # fmt: skip


def env_probe(save=lambda info: None) -> dict:
    """What the GPU machine has: device, driver, versions, clocks, and what imports (with the error if not).
    `save(info)` is called after each step, so a probe cut short still leaves what it found."""
    import importlib
    import importlib.metadata as md
    import platform

    info: dict = {"python": platform.python_version(), "platform": platform.platform(),
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)  # fmt: skip
        info["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        fields = [f.strip() for f in q.stdout.splitlines()[0].split(",")] if q.returncode == 0 and q.stdout.strip() else []
        if len(fields) >= 5:
            info["driver"] = fields[1]
            info["clocks"] = f"SM {fields[3]} now, {fields[4]} max; {', '.join(fields[5:])}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
    import torch

    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device_name=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))  # fmt: skip
    info["imports"] = {}
    save(info)
    dist = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy", "pytest_timeout": "pytest-timeout"}
    for mod in IMPORT_PROBES:
        t0 = time.monotonic()
        try:
            importlib.import_module(mod)
            top = mod.split(".")[0]
            try:
                ver = "from this tree" if top in ("grpo_kernels", "grpo") else md.version(dist.get(top, top))
            except md.PackageNotFoundError:
                ver = "?"
            got = f"ok {ver}"
        except Exception as exc:  # a probe, never a crash
            got = f"unavailable: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        info["imports"][mod] = got
        print(f"import {mod}: {got} ({time.monotonic() - t0:.1f} s)", flush=True)
        for key in ("triton", "transformers"):
            if mod == key and got.startswith("ok "):
                info[key] = got[3:]
        save(info)
    return info


def env_main(path: str) -> None:
    def save(info: dict) -> None:
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps(info, indent=1, default=str) + "\n")
        tmp.replace(path)

    info = env_probe(save)
    for k in ("device_name", "driver", "torch", "cuda", "triton", "transformers", "clocks"):
        print(f"{k}: {info.get(k)}")
    # the probe imported half the ecosystem; some of it (thread pools, atexit hooks) can take many seconds to
    # shut down, which would count against the part's budget: everything is saved, leave at once
    sys.stdout.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------------ CLI


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="folder for the (at most 8) files; on the GPU machine pass $OUT "
                   "(default bench/results/<device>-<date>/gpu in this clone, untracked until committed)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and each part's budget; run nothing")
    p.add_argument("--parts", default=None, help="comma list of part names to run (default: all)")
    p.add_argument("--total-min", type=float, default=TOTAL_S / 60,
                   help=f"hard limit for all parts together, minutes (default {TOTAL_S / 60:g})")
    p.add_argument("--commit", default=None, help="the commit measured, when the tree has no .git (the device copy has none)")


def main(args: argparse.Namespace) -> int:
    from .common import git_info

    parts = plan()
    if args.parts:
        wanted = [w.strip() for w in args.parts.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {p.name for p in parts}]
        if unknown:
            raise ValueError(f"--parts: unknown part(s) {', '.join(unknown)}; choose from {', '.join(p.name for p in parts)}")
        parts = [p for p in parts if p.name in wanted]
    if args.total_min <= 0:
        raise ValueError(f"--total-min must be positive, got {args.total_min}")
    if len(files_of(parts)) > MAX_FILES:
        raise ValueError(f"the plan writes {len(files_of(parts))} files, more than the {MAX_FILES} that come back")
    total_s = args.total_min * 60
    if args.dry_run:
        print(format_plan(parts, total_s))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("[bench gpu] no CUDA device here: the GPU parts will fail and say so (--dry-run shows the plan)", flush=True)
    gi = git_info()
    meta = {"commit": args.commit or gi.get("commit"), "dirty": gi.get("dirty") if not args.commit else None,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m bench " + " ".join(sys.argv[1:])}  # fmt: skip
    runner = Runner(parts, Path(args.out) if args.out else None, total_s, meta)
    # a timeout around the whole command sends SIGTERM: stop the running part's process group, keep the files
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    runner.run()
    summary = (runner.out / "summary.md").read_text()
    # the device tool returns the end of stdout: finish with the parts and the targets
    start = summary.find("## Parts")
    end = summary.find("\n## ", summary.find("## Targets") + 1)
    print(summary[start : end if end > 0 else None])
    print(f"wrote {len(list(runner.out.iterdir()))} files into {runner.out}")
    shutil.rmtree(runner.scratch, ignore_errors=True)
    return 0
