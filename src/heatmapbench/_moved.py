"""Old import paths kept for one release: a module that moved leaves behind a shim built here.

A shim warns once, when it is imported, with a :class:`DeprecationWarning` that names the new
home, and then hands out every name of the new modules (``from old import name``, ``old.name``,
``from old import *``). Shims import nothing else and nothing imports them: the package's own code
and tests use the new paths.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["moved"]


def moved(old: str, *new: str) -> tuple[Callable[[str], Any], list[str]]:
    """Warn that ``old`` moved to ``new[0]`` and return ``(__getattr__, __all__)`` for the shim.

    Names are looked up in the modules ``new`` in order.
    """
    warnings.warn(f"{old} is deprecated and goes in the next release; import from {new[0]} instead",
                  DeprecationWarning, stacklevel=3)
    modules = [importlib.import_module(name) for name in new]

    def __getattr__(name: str) -> Any:
        for module in modules:
            try:
                return getattr(module, name)
            except AttributeError:
                continue
        raise AttributeError(f"module {old!r} has no attribute {name!r} (it moved to {new[0]})")

    names = sorted({n for m in modules for n in getattr(m, "__all__", [])})
    return __getattr__, names
