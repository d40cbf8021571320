"""What the bench modules share: where the repository and the results are, the worker protocol, the device and
the commit measured. Imports nothing from bench, so any bench module can use it without an import cycle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# ------------------------------------------------------------------------------------------------ workers
# A worker is `python -m bench _worker`: it reads one task (a JSON dict) on stdin and prints each record it
# produces as one MARK-prefixed JSON line on stdout; anything else it prints is ignored.

MARK = "@@BENCH@@ "

WorkerBody = Callable[[dict, Callable[[dict], None]], None]


def call_worker(
    task: dict,
    on_record: Callable[[dict], None],
    in_process: bool = False,
    timeout_s: float | None = None,
    *,
    body: WorkerBody | None = None,
) -> tuple[int, str]:
    """Run one worker task; `on_record` gets each emitted dict as it arrives. Returns (exit code, stderr tail).
    In process, `body(task, on_record)` runs here: the caller names the function that serves its task kind (the
    worker process dispatches by kind in bench.cli)."""
    # tokenizers warns (and can hang) when a process forks after its thread pool ran: workers keep it off
    if in_process:
        if body is None:
            raise ValueError("call_worker: in_process=True needs body=, the function that runs the task here")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        body(task, on_record)
        return 0, ""
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench", "_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=str(REPO_ROOT),
            env=env,
        )
        timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
        if timer:
            timer.start()
        try:
            proc.stdin.write(json.dumps(task))
            proc.stdin.close()
            for line in proc.stdout:
                if line.startswith(MARK):
                    on_record(json.loads(line[len(MARK) :]))
            rc = proc.wait()
        finally:
            if timer:
                timer.cancel()
        err.seek(0)
        tail = err.read()[-2000:]
    return rc, tail


def read_task() -> dict:
    """The worker's side: its task, from stdin."""
    return json.loads(sys.stdin.read())


def emit_record(rec: dict) -> None:
    """The worker's side: one record to the parent, as it is produced."""
    sys.stdout.write(MARK + json.dumps(rec, default=str) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ metadata


def detect_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_slug(env: dict) -> str:
    """The device part of a results folder name: 'cpu', or the GPU's name in lower case with dashes."""
    if env.get("device_type") != "cuda":
        return "cpu"
    name = env.get("device_name", "cuda").lower()
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").replace("--", "-")


def git_info() -> dict:
    """The commit measured and whether the tree had uncommitted changes (None for either when git cannot say)."""

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {
        "commit": head.stdout.strip() if head and head.returncode == 0 else None,
        "dirty": bool(status.stdout.strip()) if status and status.returncode == 0 else None,
    }
