"""Old import paths kept for one release: a module that moved leaves behind a shim built here.

A shim warns once, when it is imported, with a :class:`DeprecationWarning` that names the new
home, and then hands out every name of the new modules (``from old import name``, ``old.name``,
``from old import *``). Shims import nothing else and nothing imports them: the package's own code
and tests use the new paths.

A name that left a module which stays (a function moved to a new module, or renamed) is kept the
same way by :func:`names_moved`: the old module's ``__getattr__`` warns on each use and forwards.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["moved", "names_moved"]


def moved(old: str, *new: str, renamed: dict[str, str] | None = None) -> tuple[Callable[[str], Any], list[str]]:
    """Warn that ``old`` moved to ``new[0]`` and return ``(__getattr__, __all__)`` for the shim.

    Names are looked up in the modules ``new`` in order; ``renamed`` maps an old name to the one it
    has in its new home.
    """
    warnings.warn(f"{old} is deprecated and goes in the next release; import from {new[0]} instead",
                  DeprecationWarning, stacklevel=3)
    modules = [importlib.import_module(name) for name in new]
    renamed = dict(renamed or {})

    def __getattr__(name: str) -> Any:
        for module in modules:
            try:
                return getattr(module, renamed.get(name, name))
            except AttributeError:
                continue
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to {new[0]})")

    names = sorted({n for m in modules for n in getattr(m, "__all__", [])} | set(renamed))
    return __getattr__, names


def names_moved(old: str, moves: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that left module ``old``, which stays.

    ``moves`` maps each old name to its new home, ``"package.module.name"`` (a new module, a new name,
    or both). ``old.<name>`` keeps working for one release: each use warns with a
    :class:`DeprecationWarning` that names the new home, then hands out what is there.
    """
    moves = dict(moves)

    def __getattr__(name: str) -> Any:
        if name not in moves:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        module, _, target = moves[name].rpartition(".")
        warnings.warn(f"{old}.{name} is deprecated and goes in the next release; use {moves[name]} instead",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), target)

    return __getattr__
