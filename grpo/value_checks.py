"""Range and choice checks for config values, each raising a ValueError that names the field.

A leaf module (it imports nothing from grpo) so that grpo.config and grpo.vllm_config can both use it."""

from __future__ import annotations

import difflib


def check_choice(name, value, valid):
    if value not in valid:
        shown = [v for v in valid if isinstance(v, str)]
        close = difflib.get_close_matches(str(value), shown, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{name}={value!r} is not supported; valid values: {', '.join(map(repr, shown))}.{hint}")


def check_int(name, value, lo, hint=None):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        tail = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}{tail}")


def check_number(name, value, lo=None, hi=None, lo_open=False, hi_open=False, hint=None):
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or value != value
    if not bad:
        bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
            hi is not None and (value >= hi if hi_open else value > hi)
        )
    if bad:
        left = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
        right = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
        if lo is not None and hi is not None:
            rng = f"in {left}, {right}"
        elif lo is not None:
            rng = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            rng = f"{'<' if hi_open else '<='} {hi:g}"
        tail = f": {hint}" if hint else ""
        raise ValueError(f"{name} must be a number {rng}, got {value!r}{tail}")
