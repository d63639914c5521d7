"""Shared plumbing of the Hydra entry points: clean errors for users, instantiation helpers."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

from hydra.utils import instantiate
from omegaconf import DictConfig

from heatmapbench.config import ConfigError
from heatmapbench.data import DataNotFoundError

#: Errors that are the user's input, not a bug: printed as one clear line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataNotFoundError)


def user_errors_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user error as ``error: ...`` and exit 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from err

    return wrapper


def instantiate_callbacks(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` node of the ``callbacks`` group (``null`` entries are off)."""
    if not cfg:
        return []
    return [instantiate(node) for node in cfg.values() if node is not None and "_target_" in node]
