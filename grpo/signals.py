"""Preemption: SIGTERM, SIGINT or SIGUSR1 stop a run after a checkpoint instead of losing the steps since the last one.

While GRPOTrainer.train() runs, the first of these signals only sets a flag: the current optimizer step finishes,
a checkpoint is saved (pruned under save_total_limit as usual), one line is logged and train() returns, so
`grpo train` exits 0. A second SIGINT raises KeyboardInterrupt at once (no checkpoint; `grpo train` exits 130);
a second SIGTERM or SIGUSR1 changes nothing. The trainer all-reduces `received` after every optimizer step (with
the callbacks' should_training_stop), so under torchrun every rank stops after the same step even when only one
of them got the signal.
Handlers are installed only from the main thread (Python delivers signals there) and restored when train() ends.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopOnSignal:
    def __init__(self):
        self.received: str | None = None  # name of the first signal this process got
        self._previous: dict = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        # No printing here: the handler may run in the middle of another write to stdout.
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second SIGINT (after {self.received}): stopped at once, without a checkpoint")
        if self.received is None:
            self.received = signal.Signals(signum).name

    def reason(self) -> str:
        return self.received or "a stop signal on another rank"
