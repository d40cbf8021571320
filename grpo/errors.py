"""The one exception class for mistakes a user can fix (a missing file, a bad flag, an unwritable folder).

`grpo` commands print a UserError as one line (`grpo: <message>`) and exit with status 1; anything else is a bug
and keeps its traceback. `--debug` shows the traceback of a UserError too. It subclasses ValueError so that code
catching ValueError (and tests written against it) keeps working. This module imports nothing, so every other
module may raise it.
"""


class UserError(ValueError):
    """A mistake in the user's input: the message names the flag or file, what is wrong, and what to do."""


class RewardFunctionError(UserError, RuntimeError):
    """A reward function raised: the message names it; the original exception is the __cause__ (--debug shows
    its traceback). Also a RuntimeError, what this error was before it had its own class."""


class CheckpointError(UserError):
    """A checkpoint that cannot be written or read: the message names the checkpoint, the file, the cause, and the
    newest complete earlier checkpoint to resume from (see grpo/checkpoint.py)."""


class RunLockedError(UserError):
    """The output directory is in use by another run, or holds an earlier run's checkpoints (grpo/run_lock.py)."""


class UnscorableRewardsError(UserError):
    """No completion could be scored for max_unscorable_steps steps in a row: training had no learning signal."""
