"""Callbacks: the trainer's public hooks, so that code outside it (bench/step.py's phase timing, a user's logging,
early stopping) observes and steers the loop without patching it.

GRPOTrainer(callbacks=[...]) calls each callback's methods in the order given, with transformers' TrainerCallback
signature `method(args, state, control, **kwargs)`, so a transformers `TrainerCallback` works as one:

    on_train_begin / on_train_end     around train()
    on_step_begin / on_step_end       around each optimizer step (on_step_end after it, state.global_step counted)
    on_log                            with logs=<the metrics row just written>
    on_evaluate                       with metrics=<the held-out metrics>, after every evaluate()
    on_save                           after a checkpoint is written
    on_phase_begin / on_phase_end     phase=<one of PHASES>, around every stage of the loop:
        "generation"  sampling completions of a generation batch
        "scoring"     rewards and advantages of that batch
        "logprobs"    the old-policy / reference log-probs the update compares against (when they are needed)
        "update"      forward + backward of one micro-batch (the optimizer step itself is outside every phase)

A method the callback does not define is skipped. `state` is a transformers TrainerState holding global_step,
max_steps, epoch and log_history. `control` is a TrainerControl the loop obeys as transformers' Trainer does
(a callback may also return a TrainerControl, which replaces it): before on_step_end the trainer sets should_log,
should_evaluate and should_save to what logging_steps, eval_steps and save_steps ask for at this step, and a
callback may change them there (or should_evaluate / should_save in on_log, should_save in on_evaluate);
should_training_stop, set in any event, ends train() after the current step with a checkpoint. The handler
clears the flags as transformers' does: should_log / should_evaluate / should_save at every step's begin and once
acted upon, should_training_stop at train()'s begin. should_epoch_stop has no effect (the loop counts steps, not
epochs).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

PHASES = ("generation", "scoring", "logprobs", "update")
EVENTS = ("on_train_begin", "on_train_end", "on_step_begin", "on_step_end", "on_log", "on_evaluate", "on_save",
          "on_phase_begin", "on_phase_end")
# The flags each event clears before the callbacks run (transformers' CallbackHandler does the same).
_CLEARS = {"on_train_begin": ("should_training_stop",),
           "on_step_begin": ("should_log", "should_evaluate", "should_save"),
           "on_log": ("should_log",), "on_evaluate": ("should_evaluate",), "on_save": ("should_save",)}


@runtime_checkable
class PhaseCallback(Protocol):
    """The phase events alone; a callback may define these, transformers' events, or both."""

    def on_phase_begin(self, args, state, control, phase: str, **kwargs) -> None: ...

    def on_phase_end(self, args, state, control, phase: str, **kwargs) -> None: ...


class CallbackHandler:
    """Calls the events on every callback; the trainer holds one."""

    def __init__(self, callbacks, args, trainer_state):
        if callbacks is None:
            callbacks = []
        if not isinstance(callbacks, (list, tuple)):
            raise TypeError(f"callbacks must be a list of callback objects, got {type(callbacks).__name__}")
        for i, cb in enumerate(callbacks):
            if isinstance(cb, type):
                raise TypeError(f"callbacks[{i}] is the class {cb.__name__}: pass an instance")
            if not any(callable(getattr(cb, e, None)) for e in EVENTS):
                raise TypeError(f"callbacks[{i}] ({type(cb).__name__}) defines none of {', '.join(EVENTS)}")
        from transformers import TrainerControl

        self.callbacks = list(callbacks)
        self.args = args
        self.state = trainer_state
        self.control = TrainerControl()
        self._control_class = TrainerControl

    def event(self, name: str, **kwargs):
        """Calls `name` on every callback that defines it; returns the control the loop then obeys."""
        for flag in _CLEARS.get(name, ()):
            setattr(self.control, flag, False)
        for cb in self.callbacks:
            method = getattr(cb, name, None)
            if method is not None:
                result = method(self.args, self.state, self.control, **kwargs)
                if result is not None:  # transformers: a callback may return the control, or a new one
                    if not isinstance(result, self._control_class):
                        raise TypeError(f"{type(cb).__name__}.{name} returned a {type(result).__name__}; a callback "
                                        "returns None or a transformers TrainerControl")
                    self.control = result
        return self.control

    def phase(self, name: str):
        return _Phase(self, name)


class _Phase:
    """`with handler.phase("scoring"):` → on_phase_begin / on_phase_end (also when the body raises)."""

    def __init__(self, handler: CallbackHandler, name: str):
        self.handler, self.name = handler, name

    def __enter__(self):
        self.handler.event("on_phase_begin", phase=self.name)

    def __exit__(self, *exc):
        self.handler.event("on_phase_end", phase=self.name)
        return False
