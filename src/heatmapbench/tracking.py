"""The MLflow run lifecycle, in one place, for every entry point.

``tracked_run`` logs the resolved config (YAML artifact and flattened params), the Hydra
overrides, the git commit and the package version, and marks the run FAILED when the body
raises. The sqlite store is made safe for concurrent sweep jobs (WAL, busy timeout, retries).
"""

from __future__ import annotations

import contextlib
import functools
import random
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from omegaconf import DictConfig, OmegaConf

import heatmapbench

T = TypeVar("T")


def git_commit(cwd: str | Path | None = None) -> str:
    """The current git commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    cwd = str(cwd or Path(heatmapbench.__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping into ``{"a.b.c": value}`` strings (MLflow params)."""
    out: dict[str, str] = {}
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(cfg, (list, tuple)) and any(isinstance(v, (dict, list)) for v in cfg):
        for i, value in enumerate(cfg):
            out.update(flatten(value, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = str(cfg)[:6000]
    return out


def retry_locked(fn: Callable[..., T], attempts: int = 12, base_delay: float = 0.2) -> Callable[..., T]:
    """Retry ``fn`` with jittered exponential backoff while sqlite says the database is locked."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # MLflow wraps sqlite errors in several exception types
                text = str(err).lower()
                if attempt == attempts - 1 or not ("locked" in text or "busy" in text):
                    raise
                time.sleep(base_delay * (2 ** min(attempt, 5)) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    return wrapper


def prepare_sqlite_store(tracking_uri: str) -> None:
    """Create the sqlite store's folder and switch it to WAL with a busy timeout.

    WAL lets readers and one writer work at once; the busy timeout makes a writer wait for
    the lock instead of failing, which is what concurrent sweep jobs need.
    """
    if not tracking_uri.startswith("sqlite:///"):
        return
    import sqlite3

    path = Path(tracking_uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(20):
        try:
            with contextlib.closing(sqlite3.connect(str(path), timeout=60)) as con:
                con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            time.sleep(0.1 * (attempt + 1))


def _overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not inside a Hydra app
        return []


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain containers with interpolations resolved (without Hydra's own node)."""
    return {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key])
            else cfg[key] for key in cfg if key != "hydra"}


def run_identity(cfg: DictConfig) -> tuple[str | None, dict[str, str]]:
    """A run name from the Hydra overrides and, inside a sweep (``-m``), the sweep's tags.

    Every job of one sweep gets the same ``sweep_id`` (its sweep directory) plus its job
    number and overrides, so the runs can be filtered together in the UI and in ``report``.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ValueError, ImportError):
        return None, {}
    overrides = [o for o in hc.overrides.task if not o.startswith(("hydra.", "paths.", "logger."))]
    name = ",".join(overrides)[:250] or None
    if hc.mode != RunMode.MULTIRUN:
        return name, {}
    sweep_dir = Path(str(hc.sweep.dir))
    tags = {"sweep_id": f"{sweep_dir.parent.parent.name}/{sweep_dir.name}",
            "sweep_job": str(hc.job.num), "sweep_overrides": " ".join(overrides) or "(none)"}
    return name or f"job{hc.job.num}", tags


def log_config(logger: Any, cfg: DictConfig, extra_tags: dict[str, str] | None = None) -> None:
    """Log the resolved config as params and a ``config.yaml`` artifact, plus provenance tags."""
    client, run_id = logger.experiment, logger.run_id
    resolved = resolved_config(cfg)
    params = flatten(resolved)
    retry_locked(logger.log_hyperparams)(params)
    overrides = _overrides()
    tags = {"git_commit": git_commit(), "heatmapbench_version": heatmapbench.__version__,
            "hydra_overrides": " ".join(overrides) or "(none)", **(extra_tags or {})}
    for key, value in tags.items():
        retry_locked(client.set_tag)(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(OmegaConf.to_yaml(resolved))
        (Path(tmp) / "overrides.txt").write_text("\n".join(overrides) + "\n")
        retry_locked(client.log_artifact)(run_id, str(path))
        retry_locked(client.log_artifact)(run_id, str(Path(tmp) / "overrides.txt"))


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise creating a sqlite store, its experiment and a run across processes.

    Concurrent sweep jobs otherwise race on the first schema migration and on creating the
    same experiment (a UNIQUE constraint error for all but one). Other stores need no lock.
    """
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = Path(tracking_uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_logger(logger_cfg: DictConfig, **kwargs: Any) -> Any:
    """Instantiate the MLflow logger from its config, safely for parallel jobs on one sqlite store.

    The logger's client creates (and migrates) the store when it is built, so that happens
    under :func:`store_lock`, in WAL mode.
    """
    from hydra.utils import instantiate

    uri = str(logger_cfg.get("tracking_uri") or "")
    with store_lock(uri):
        prepare_sqlite_store(uri)
        return retry_locked(instantiate)(logger_cfg, **kwargs)


@contextlib.contextmanager
def tracked_run(logger: Any, cfg: DictConfig, extra_tags: dict[str, str] | None = None) -> Iterator[Any]:
    """Open the logger's MLflow run, log the config, and close it FINISHED or FAILED."""
    with store_lock(str(getattr(logger, "_tracking_uri", "") or "")):  # store prepared by make_logger
        retry_locked(lambda: logger.experiment)()  # creates the experiment and the run
    log_config(logger, cfg, extra_tags)
    try:
        yield logger
    except BaseException:
        retry_locked(logger.finalize)("failed")
        raise
    retry_locked(logger.finalize)("success")
