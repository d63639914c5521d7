"""The MLflow store under the runs: its URI, locking, bounded retries and the disk reserve.

Every entry point reaches the store through here: :func:`sqlite_path` is the one reading of a
``sqlite:///<path>`` tracking URI; :func:`make_logger` opens the store for a run, safely for
parallel sweep jobs on one sqlite file (:func:`store_lock`, WAL and a busy timeout,
:func:`retry_locked`) and with MLflow's HTTP retries bounded (:data:`HTTP_RETRIES`); a store whose
creation was cut short is removed or named (:class:`StoreError`); :func:`space_reserve` keeps room
for the store to record a run FAILED when the disk fills up. The run's lifecycle (what is logged,
how it ends) is :mod:`heatmapbench.app.tracking`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")

__all__ = ["HTTP_LAST_TRY", "HTTP_RETRIES", "RESERVE_BYTES", "SQLITE", "StoreError", "bound_http_retries",
           "disk_full", "half_made", "make_logger", "one_line", "prepare_sqlite_store", "retry_locked",
           "space_reserve", "sqlite_path", "store_exists", "store_lock", "temporary_environ", "worst_case_http_seconds"]

#: The scheme of a local store: ``sqlite:///`` followed by the database file's path.
SQLITE = "sqlite:///"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///<path>`` tracking URI; None for any other store (a server)."""
    uri = str(tracking_uri)
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def store_exists(tracking_uri: str) -> bool:
    """False for a sqlite store whose file is not there yet (opening it would create an empty one);
    True for any other store (a server is asked when it is used)."""
    path = sqlite_path(tracking_uri)
    return path is None or path.is_file()


def one_line(err: BaseException) -> str:
    """``ValueError: <message on one line>`` (at most 500 characters)."""
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text}"[:500]


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
    path = sqlite_path(tracking_uri)
    if path is None:
        return
    import sqlite3

    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(20):
        try:
            with contextlib.closing(sqlite3.connect(str(path), timeout=60)) as con:
                con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            time.sleep(0.1 * (attempt + 1))


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise creating a sqlite store, its experiment and a run across processes.

    Concurrent sweep jobs otherwise race on the first schema migration and on creating the
    same experiment (a UNIQUE constraint error for all but one). Other stores need no lock.
    """
    path = sqlite_path(tracking_uri)
    if path is None:
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# -- a store behind HTTP ----------------------------------------------------------------------------
#: MLflow's HTTP retries, bounded: a server that went away is given up on within about a minute
#: (MLflow's own defaults retry 7 times with a 2 s backoff factor and a 120 s timeout: minutes per
#: call). A value the user exported is kept.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
#: Closing a run after logging already failed: one try, a short timeout.
HTTP_LAST_TRY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def bound_http_retries() -> None:
    """Set :data:`HTTP_RETRIES` in the environment where the user did not (MLflow reads it per request)."""
    for key, value in HTTP_RETRIES.items():
        os.environ.setdefault(key, value)


def worst_case_http_seconds() -> float:
    """The longest one MLflow HTTP call can take under the environment's retry settings: every try
    timing out plus urllib3's backoff (``factor * 2**(n-1)`` after the n-th failure) and its jitter."""
    retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7"))
    factor = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2"))
    jitter = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "1"))
    timeout = float(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "120"))
    backoff = sum(min(factor * 2 ** (n - 1), 120.0) + jitter for n in range(1, retries + 1))
    return (retries + 1) * timeout + backoff


@contextlib.contextmanager
def temporary_environ(values: dict[str, str]) -> Iterator[None]:
    """While open, the environment variables ``values`` are set (e.g. :data:`HTTP_LAST_TRY`); then restored."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- opening the store for a run --------------------------------------------------------------------
class StoreError(RuntimeError):
    """The MLflow store cannot be created or opened; the message names the file and what to do."""


def make_logger(logger_cfg: Any, **kwargs: Any) -> Any:
    """Instantiate the MLflow logger from its config, safely for parallel jobs on one sqlite store.

    The logger's client creates (and migrates) the store when it is built, so that happens
    under :func:`store_lock`, in WAL mode. HTTP retries are bounded (:data:`HTTP_RETRIES`).
    """
    from hydra.utils import instantiate

    bound_http_retries()
    uri = str(logger_cfg.get("tracking_uri") or "")
    with store_lock(uri):
        path = sqlite_path(uri)
        new = path is not None and not path.exists()
        try:
            prepare_sqlite_store(uri)
            return retry_locked(instantiate)(logger_cfg, **kwargs)
        except Exception as err:
            if path is None:
                raise
            _forget_engine(uri)  # MLflow keeps one engine per store URI, with connections to the failed file
            if new:  # its creation was cut short (a full disk): nothing of value in it, nothing left behind
                for leftover in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
                    leftover.unlink(missing_ok=True)
                raise StoreError(f"could not create the MLflow store {path} ({one_line(err)[:300]}); nothing was "
                                 "left behind: free space (or fix the folder) and rerun") from err
            if half_made(path):
                raise StoreError(f"the MLflow store {path} was left half-made when its creation was cut short (it "
                                 f"holds no runs): delete {path} and rerun ({one_line(err)[:200]})") from err
            raise


def _forget_engine(uri: str) -> None:
    """Drop MLflow's cached SQLAlchemy engine of ``uri`` (if this MLflow has the cache) and close its connections."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    except ImportError:  # pragma: no cover
        return
    engines = getattr(SqlAlchemyStore, "_engine_map", None)
    engine = engines.pop(uri, None) if isinstance(engines, dict) else None
    if engine is not None:
        engine.dispose()


def half_made(path: Path) -> bool:
    """Whether the sqlite file at ``path`` (which MLflow failed to open) is a store that holds nothing: some
    tables, no runs, no experiment but MLflow's ``Default``. Its creation or migration was cut short;
    deleting it loses nothing."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as con:
            tables = {row[0] for row in con.execute("select name from sqlite_master where type = 'table'")}
            runs = con.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0
            experiments = con.execute("select count(*) from experiments").fetchone()[0] if "experiments" in tables else 0
    except sqlite3.Error:
        return False
    return bool(tables) and not runs and experiments <= 1


# -- a full disk ------------------------------------------------------------------------------------
def disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an error it came from) says the disk is full (``ENOSPC``, sqlite's
    ``database or disk is full``)."""
    import errno

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(err)
        if "No space left on device" in text or "database or disk is full" in text or "Disk quota exceeded" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


#: Space set aside beside a sqlite store while a run is open, given back to let the store record
#: FAILED when the disk fills up (a status and a tag need a few pages).
RESERVE_BYTES = 1 << 20


@contextlib.contextmanager
def space_reserve(tracking_uri: str) -> Iterator[Callable[[], None]]:
    """While open, a :data:`RESERVE_BYTES` file beside a local sqlite store; yields a function that frees it."""
    db = sqlite_path(tracking_uri)
    if db is None:
        yield lambda: None
        return
    reserve = db.with_name(f".{db.name}.reserve-{os.getpid()}")
    try:
        with open(reserve, "wb") as handle:
            handle.write(bytes(RESERVE_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:  # no space for it: the run goes on without
        reserve.unlink(missing_ok=True)
    try:
        yield lambda: reserve.unlink(missing_ok=True)
    finally:
        reserve.unlink(missing_ok=True)
