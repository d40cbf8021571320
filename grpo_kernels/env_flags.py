"""The environment flags grpo_kernels reads, parsed in one place by one rule.

A leaf: it imports nothing from the package, so any module (the Triton kernels included) may read a flag without
an import cycle. Each flag is read when asked, so tests can set it with monkeypatch.setenv.
"""

from __future__ import annotations

import os

_ON = ("1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")


def _flag(name: str, default: bool) -> bool:
    """An unset variable gives `default`; else a default-off flag is on only for 1/true/on/yes and a default-on flag
    is off only for 0/false/off/no (any case, surrounding blanks ignored)."""
    value = os.environ.get(name)
    if value is None:
        return default
    value = value.strip().lower()
    return value not in _OFF if default else value in _ON


def triton_interpret() -> bool:
    """TRITON_INTERPRET, read as Triton reads it: Triton kernels run in its CPU interpreter."""
    return _flag("TRITON_INTERPRET", False)


def debug() -> bool:
    """GRPO_KERNELS_DEBUG: log each call's sizing decision on the "grpo_kernels" logger."""
    return _flag("GRPO_KERNELS_DEBUG", False)


def native_enabled() -> bool:
    """GRPO_KERNELS_NATIVE: the native CPU chunk epilogue (on unless switched off)."""
    return _flag("GRPO_KERNELS_NATIVE", True)
