"""Replace module attributes and put them back: the one mechanism behind every adapter's patch()/unpatch()."""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any, Iterator

_MISSING = object()


def _attributes_under(prefix: str) -> Iterator[tuple[ModuleType, str, Any]]:
    """(module, name, value) for every attribute of the loaded modules named `prefix` or `prefix.*`."""
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == prefix or mod_name.startswith(prefix + ".")):
            continue
        try:  # vars() does not trigger lazy-module imports the way getattr would
            items = list(vars(module).items())
        except TypeError:
            continue
        for name, value in items:
            yield module, name, value


class Bindings:
    """The (module, name) -> value replacements made by one patch(), in order, with what was there before."""

    def __init__(self) -> None:
        self._saved: list[tuple[ModuleType, str, Any]] = []

    def replace(self, module: ModuleType, name: str, new: Any) -> None:
        self._saved.append((module, name, vars(module).get(name, _MISSING)))
        setattr(module, name, new)

    def replace_everywhere(self, prefix: str, old: Any, new: Any) -> list[str]:
        """Rebind every attribute that is `old` in the loaded modules under `prefix`: trainers that did
        `from .utils import X` hold their own binding of X. Returns the 'module.name' strings replaced."""
        done = []
        for module, name, value in _attributes_under(prefix):
            if value is old:
                self.replace(module, name, new)
                done.append(f"{module.__name__}.{name}")
        return done

    def restore(self, prefix: str = "", leftovers: dict | None = None) -> None:
        """Put back what replace() changed; then, under `prefix`, rebind any attribute still holding a key of
        `leftovers` (modules imported after patch() copied our object) to its value."""
        for module, name, value in reversed(self._saved):
            if value is _MISSING:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, value)
        self._saved.clear()
        for module, name, value in _attributes_under(prefix) if leftovers else ():
            for ours, original in leftovers.items():
                if value is ours:
                    setattr(module, name, original)

    def names(self) -> list[str]:
        return [f"{m.__name__}.{n}" for m, n, _ in self._saved]
