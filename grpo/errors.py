"""Errors a user can act on. Their message is one line that says what is wrong and what to do; the command line
prints it without a traceback (`grpo train` exits 1)."""

from __future__ import annotations


class UserError(RuntimeError):
    """A problem with the run's inputs or surroundings (files, disk, another run), not a bug in grpo."""


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read: names the checkpoint, the file, the cause, and the newest
    complete earlier checkpoint to resume from."""


class RunLockedError(UserError):
    """The output directory is in use by another run, or holds an earlier run's checkpoints."""


class RewardError(UserError, ValueError):
    """Reward functions that give no learning signal, step after step."""
