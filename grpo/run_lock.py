"""One run per output directory.

A run holds an exclusive `fcntl.flock` on `<output_dir>/.grpo-run.lock` for its lifetime (the file holds the
holder's PID and host); a second run into the same directory stops at once with one line naming that PID. The
lock is the kernel's, so a killed run never leaves a stale lock behind. Holding it, the run may also:
- refuse a fresh start into a directory that holds an earlier run's checkpoints (unless resuming, or with
  `overwrite_output_dir`, which deletes them), so the earlier run's checkpoints and metrics are not mixed up
  with or replaced by a new run's;
- delete the temporary folders of saves that a kill interrupted.
Under torchrun only the main rank locks; the other ranks learn the outcome from it, so all of them stop together.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

from .errors import RunLockedError

LOCK_NAME = ".grpo-run.lock"
_held: dict[str, list] = {}  # resolved output dir -> [fd, count]: a process may take its own lock again


def acquire(output_dir: str | os.PathLike) -> None:
    """Take the output directory's lock (re-entrant within a process) or raise RunLockedError naming the holder."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    key = str(root.resolve())
    if key in _held:
        _held[key][1] += 1
        return
    path = root / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a PID not yet written"
            os.close(fd)
            raise RunLockedError(f"{output_dir} is in use by another grpo run (PID {holder}); wait for it to "
                                 "finish or choose another --output_dir") from None
        except OSError as e:  # a file system without flock (some network mounts): run, but say so
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            print(f"[grpo] warning: {output_dir} does not support file locks ({e.strerror}): nothing stops a second "
                  "run from writing into it at the same time", file=sys.stderr, flush=True)
            _held[key] = [None, 1]
            return
        # The holder deletes the file when it releases it: if that happened between our open and our flock,
        # we locked a file nobody else can see. Start over on the current one.
        try:
            current = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[key] = [fd, 1]


def release(output_dir: str | os.PathLike) -> None:
    key = str(Path(output_dir).resolve())
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        if entry[0] is None:  # no lock was possible (see acquire)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(Path(output_dir) / LOCK_NAME)  # while still locked: see acquire
        os.close(entry[0])


def check_fresh_start(output_dir: str | os.PathLike, resuming: bool, overwrite: bool) -> None:
    """A run that neither resumes nor overwrites must not start in a directory holding checkpoints."""
    from .checkpoint import list_checkpoints

    found = list_checkpoints(output_dir)
    if found and not resuming and not overwrite:
        span = found[0].name if len(found) == 1 else f"{found[0].name} to {found[-1].name}"
        raise RunLockedError(
            f"{output_dir} already holds checkpoints of an earlier run ({span}): continue it with "
            "--resume_from_checkpoint latest, or start over with --overwrite_output_dir true (deletes them)")


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def holding(output_dir: str | os.PathLike, resuming: bool = False, overwrite: bool = False):
    """For a whole command-line run, before anything is loaded: the lock (main process only) and the fresh-start
    check, so that a second run stops at once rather than after loading a model."""
    if not _main_process():
        yield
        return
    acquire(output_dir)
    try:
        check_fresh_start(output_dir, resuming, overwrite)
        yield
    finally:
        release(output_dir)


@contextlib.contextmanager
def claim(output_dir: str | os.PathLike, info, resuming: bool, overwrite: bool):
    """For GRPOTrainer.train(): the lock and the fresh-start check on the main rank, agreed by every rank;
    with overwrite, the earlier run's checkpoints are deleted; leftovers of interrupted saves are removed."""
    from . import checkpoint, distributed

    refused, locked = None, False
    if info.is_main:
        try:
            acquire(output_dir)
            locked = True
            check_fresh_start(output_dir, resuming, overwrite)
            if overwrite and not resuming:
                for p in checkpoint.list_checkpoints(output_dir):
                    checkpoint.shutil.rmtree(p)
            checkpoint.remove_leftovers(output_dir)
        except RunLockedError as e:
            refused = str(e)
    refused = distributed.all_gather_object(refused, info)[0]
    try:
        if refused:
            raise RunLockedError(refused)
        yield
    finally:
        if locked:
            release(output_dir)
