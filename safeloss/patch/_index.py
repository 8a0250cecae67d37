"""Which imported modules bind a patched name, found at a cost independent of ``len(sys.modules)``.

``patch()`` rebinds the global ``cross_entropy`` (and ``linear_cross_entropy``) of modules that
ran ``from torch.nn.functional import cross_entropy``. Looking through every module on each
``patch()`` / ``unpatch()`` cost 5-40 ms with Transformers loaded (3,000 modules), more than a
small model's training step, so ``with safeloss.patch():`` around a step was slow. Instead, each
module is looked at once, when it is first seen, and only the few whose globals hold one of the
names are kept (the *holders*).

New modules are found from the end of ``sys.modules``: a dict keeps insertion order and an import
appends, so walking it backwards up to the last module seen before costs one step per new module.
Where that anchor is gone (its entry deleted or replaced), one full walk starts over: rare, and
never wrong. Modules still being imported when they are looked at (``__main__`` always, and any
module whose import is in progress, such as the script that called ``patch()`` at its top) may bind
a name later, so they are looked at again on every update (a handful of dict reads).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any


def _initializing(mod: ModuleType) -> bool:
    spec = getattr(mod, "__spec__", None)
    return mod.__name__ == "__main__" if spec is None else bool(getattr(spec, "_initializing", False))


class ModuleIndex:
    """The globals dicts of imported modules that hold one of ``names`` (safeloss's own excluded)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.holders: list[dict[str, Any]] = []
        self._held: set[int] = set()  # id() of each dict in holders (they are kept alive there)
        self._anchor: tuple[str, object] | None = None  # (name, module) of the newest module seen
        self._watch: dict[int, tuple[ModuleType, dict[str, Any]]] = {}  # imports in progress
        # For tests and the benchmark: whole walks of sys.modules, and modules looked at in all.
        self.full_walks = 0
        self.looked = 0

    def _look(self, name: str, mod: object) -> None:
        self.looked += 1
        if name == "safeloss" or name.startswith("safeloss."):
            return  # safeloss's own modules must keep stock torch
        d = getattr(mod, "__dict__", None)  # a few sys.modules entries are not modules
        if not isinstance(d, dict):
            return
        if any(n in d for n in self.names):
            self._hold(d)
        elif name == "__main__" or (isinstance(mod, ModuleType) and _initializing(mod)):
            self._watch[id(d)] = (mod, d)  # type: ignore[assignment]

    def _hold(self, d: dict[str, Any]) -> None:
        if id(d) not in self._held:
            self._held.add(id(d))
            self.holders.append(d)

    def _new_names(self) -> list[str] | None:
        """Names added to sys.modules since the last update, oldest first; None: walk everything."""
        mods = sys.modules
        if self._anchor is None:
            return None
        name, mod = self._anchor
        if mods.get(name) is not mod:
            return None
        new: list[str] = []
        try:
            for key in reversed(mods):
                if key == name:
                    new.reverse()
                    return new
                new.append(key)
        except RuntimeError:  # another thread imported during the walk: start over, whole
            return None
        return None  # unreachable while the anchor is in sys.modules

    def update(self) -> list[dict[str, Any]]:
        """Look at the modules imported since the last call; return every holder."""
        mods = sys.modules
        names = self._new_names()
        if names is None:
            self.full_walks += 1
            items = list(mods.items())  # a copy: imports on other threads cannot break the walk
        else:
            items = [(n, mods[n]) for n in names if n in mods]
        for name, mod in items:
            self._look(name, mod)
        if items:
            self._anchor = items[-1]
        elif self._anchor is None and mods:
            last = next(reversed(mods))
            self._anchor = (last, mods[last])
        if self._watch:
            for key, (mod, d) in list(self._watch.items()):
                if any(n in d for n in self.names):
                    self._hold(d)
                    del self._watch[key]
                elif mod.__name__ != "__main__" and not _initializing(mod):
                    del self._watch[key]  # imported completely without binding a name
        return self.holders
