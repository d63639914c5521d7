"""The MLflow run lifecycle, in one place, for every entry point.

``tracked_run`` logs the resolved config (YAML artifact and flattened params), the Hydra
overrides, the git commit and the package version, and ends the run FINISHED, FAILED (any
exception, config logging included) or KILLED (SIGINT/SIGTERM), with a one-line
``end_reason`` tag. What a run records about itself (params, name, tags) is
:mod:`heatmapbench.app.provenance`; the store under the runs (its URI, locking, retries, the
disk reserve) is :mod:`heatmapbench.app.store`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import sys
import tempfile
import _thread
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

import heatmapbench
from heatmapbench._moved import names_moved
from heatmapbench.app.provenance import git_commit, hydra_overrides, readable_params, resolved_config
from heatmapbench.app.store import (
    HTTP_LAST_TRY,
    disk_full,
    one_line,
    retry_locked,
    space_reserve,
    store_lock,
    temporary_environ,
)

#: Names that moved to :mod:`heatmapbench.app.store` and :mod:`heatmapbench.app.provenance`;
#: ``heatmapbench.app.tracking.<name>`` keeps working, with a deprecation warning, for one release.
__getattr__ = names_moved(__name__, {
    **{name: f"heatmapbench.app.store.{name}" for name in (
        "HTTP_RETRIES", "RESERVE_BYTES", "StoreError", "bound_http_retries", "half_made", "make_logger",
        "prepare_sqlite_store", "worst_case_http_seconds")},
    **{name: f"heatmapbench.app.provenance.{name}" for name in ("TRAINER_PARAMS", "flatten", "run_identity",
                                                                 "run_tags")}})


def log_config(logger: Any, cfg: DictConfig, extra_tags: dict[str, str] | None = None,
               resumed: bool = False) -> None:
    """Log the resolved config as params and a ``config.yaml`` artifact, plus provenance tags.

    In a ``resumed`` run (params are immutable in MLflow), only new params are logged; the
    resumed config and overrides go to ``resume_<n>/`` and the changed keys to a tag.
    """
    client, run_id = logger.experiment, logger.run_id
    resolved = resolved_config(cfg)
    params = readable_params(cfg)
    folder = None
    if resumed:
        run = retry_locked(client.get_run)(run_id)
        old = run.data.params
        changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
        params = {k: v for k, v in params.items() if k not in old}
        folder = f"resume_{int(run.data.tags.get('resumes', '0')) + 1}"
        extra_tags = {**(extra_tags or {}), "resumes": folder.split("_")[1],
                      f"{folder}_changed": ",".join(changed)[:5000] or "(none)"}
    if params:
        retry_locked(logger.log_hyperparams)(params)
    overrides = hydra_overrides()
    tags = {"git_commit": git_commit(), "heatmapbench_version": heatmapbench.__version__,
            "hydra_overrides": " ".join(overrides) or "(none)", **(extra_tags or {})}
    for key, value in tags.items():
        retry_locked(client.set_tag)(run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(OmegaConf.to_yaml(resolved))
        (Path(tmp) / "overrides.txt").write_text("\n".join(overrides) + "\n")
        retry_locked(client.log_artifact)(run_id, str(path), folder)
        retry_locked(client.log_artifact)(run_id, str(Path(tmp) / "overrides.txt"), folder)


class LoggingFailedError(RuntimeError):
    """Logging finished results to MLflow failed; they are safe in a folder the message names."""


@contextlib.contextmanager
def results_kept_in(folder: str | Path) -> Iterator[None]:
    """Turn a failure while logging results already written to ``folder`` into one line that says where
    they are (:class:`LoggingFailedError`); the run is then closed FAILED by :func:`tracked_run`."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - whatever the store raised, the results are safe
        raise LoggingFailedError(f"logging to MLflow failed ({end_reason(err)[:300]}); the results are saved in "
                                 f"{folder}") from err


def write_metrics(metrics: dict[str, float], path: Path) -> Path:
    """The metrics logged to MLflow, also as a JSON file beside the other results (NaN as null)."""
    import json
    import math

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                for k, v in sorted(metrics.items())}, indent=1) + "\n")
    return path


def log_skipped(logger: Any, skipped: list[str]) -> None:
    """The count (tag ``skipped_images``) and names (artifact ``skipped_images.txt``) of input files left out."""
    retry_locked(logger.experiment.set_tag)(logger.run_id, "skipped_images", str(len(skipped)))
    if skipped:
        retry_locked(logger.experiment.log_text)(logger.run_id, "\n".join(skipped) + "\n", "skipped_images.txt")


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM arrived while a run was open; the entry point exits ``128 + signum``.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception`` swallows
    it, but not a ``KeyboardInterrupt``: Lightning turns that into ``sys.exit(1)``.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"{signal.Signals(self.signum).name} received")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal

    def __reduce__(self) -> tuple[Any, tuple[int]]:  # a sweep worker sends it back to the parent pickled
        return type(self), (self.signum,)


# -- a sweep's worker processes ------------------------------------------------------------------
#: Set by :class:`SweepSignals` in a sweep's parent, inherited by the worker processes a parallel
#: launcher starts: the parent's pid, and its ledger folder, where each worker notes that it handles
#: signals (a file ``<pid>``) and that it may have a run open (``<pid>.run``), and each job that
#: started (``job-<num>``).
SWEEP_PARENT_ENV = "HEATMAPBENCH_SWEEP_PARENT"
SWEEP_LEDGER_ENV = "HEATMAPBENCH_SWEEP_LEDGER"
#: The signal a sweep worker received (at most one): once set, the worker starts no job and no run.
_STOPPING: list[int] = []


def sweep_ledger() -> Path | None:
    """In a worker process of a parallel sweep (not the sweep's parent), the parent's ledger folder."""
    parent, folder = os.environ.get(SWEEP_PARENT_ENV), os.environ.get(SWEEP_LEDGER_ENV)
    if not parent or not folder or parent == str(os.getpid()) or not Path(folder).is_dir():
        return None
    return Path(folder)


def _note_stop(signum: int, frame: Any = None) -> None:
    """A sweep worker's handler between runs: remember the signal (no later job or run starts) and go
    on, so that the worker stays in its pool (a worker that dies makes the pool kill the others, also
    while they close their runs)."""
    if not _STOPPING:
        _STOPPING.append(int(signum))


@contextlib.contextmanager
def _marked_open() -> Iterator[None]:
    """In a sweep worker: refuse to open a run after a signal, else note in the ledger that a run may be
    open until the block exits (the parent, on a signal, waits for that note to go)."""
    ledger = sweep_ledger()
    if ledger is None:
        yield
        return
    if _STOPPING:  # checked after interrupts_raise took over: a later signal raises
        raise RunInterrupted(_STOPPING[0])
    note = ledger / f"{os.getpid()}.run"
    note.touch()
    try:
        yield
    finally:
        note.unlink(missing_ok=True)


class Interrupts:
    """What :func:`interrupts_raise` knows while it is open: the signal received, and whether the run is
    being closed."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.closing = False
        #: A signal that arrived while the run was being closed: the run ends as it was, then this is raised.
        self.late: int | None = None
        self.deferred = False  # the signal arrived inside the store client: raised a moment later

    def check(self) -> None:
        """Raise :class:`RunInterrupted` if a signal arrived whose exception never got here.

        A handler's exception is lost when the signal lands while a finalizer runs (``__del__``, a
        weakref callback: MLflow's and SQLAlchemy's objects are collected all through logging):
        CPython prints ``Exception ignored in ...`` and goes on. The run is then ended at this check.
        """
        if self.signum is not None and not self.closing:
            raise RunInterrupted(self.signum)


#: Modules whose code a signal's exception must not interrupt (see :func:`interrupts_raise`).
_STORE_CLIENT = ("mlflow.", "sqlalchemy.", "sqlite3")


def _in_store_client(frame: Any) -> bool:
    """Whether ``frame`` or a caller of it runs the MLflow store's client code."""
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith(_STORE_CLIENT):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def interrupts_raise() -> Iterator[Interrupts]:
    """While open, the first SIGINT or SIGTERM raises :class:`RunInterrupted` in the main thread.

    Later signals are ignored until the block exits, so that closing the run is not cut short. The
    first one's exception can be lost (:meth:`Interrupts.check` raises it again). Lightning's own
    SIGTERM handler calls this one after its own (it chains existing handlers).
    """
    state = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    signums = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in signums}

    def handler(signum: int, frame: Any) -> None:
        if state.closing:
            state.late = state.late or signum
            return
        if state.signum is not None and not (state.deferred and signum == state.signum):
            return
        state.signum = signum
        _note_stop(signum)
        if _in_store_client(frame):
            # raised inside the store's client, the exception can leave a database transaction open (a
            # sqlite store then stays locked for the writes that close the run): raise it just after
            state.deferred = True
            threading.Timer(0.05, lambda: None if state.closing else _thread.interrupt_main(signum)).start()
            return
        state.deferred = False
        raise RunInterrupted(signum)

    for s in signums:
        signal.signal(s, handler)
    try:
        yield state
    finally:
        state.closing = True
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


class SweepSignals(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): a SIGINT/SIGTERM to a sweep's parent reaches its workers.

    A parallel launcher (joblib) runs the jobs in worker processes; the signal that ``docker stop``,
    Kubernetes or a shell sends to the parent alone would end it and leave the workers computing.
    While a sweep runs, the parent passes the signal on to every worker that has started a job (each
    worker then ends its open run KILLED, and starts no other job or run), waits (up to ``grace_s``)
    until no worker has a run open, ends every process below it (also those the pool started
    meanwhile), says how many jobs had started, and exits ``128 + signal``. The workers keep to
    their pool until then: one that died would make the pool kill the others, also while they close
    their runs. Jobs run in the parent itself (the basic launcher) handle the signal in
    :func:`tracked_run`; this handler then stops the sweep between jobs.
    """

    def __init__(self, grace_s: float = 60.0) -> None:
        self.grace_s = float(grace_s)
        self._previous: dict[int, Any] = {}
        self._ledger: Path | None = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:  # noqa: D102
        if threading.current_thread() is not threading.main_thread():
            return
        self._ledger = Path(tempfile.mkdtemp(prefix="heatmapbench-sweep-"))
        os.environ[SWEEP_PARENT_ENV], os.environ[SWEEP_LEDGER_ENV] = str(os.getpid()), str(self._ledger)
        sweep_dir = str(OmegaConf.select(config, "hydra.sweep.dir"))
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, functools.partial(self._forward, sweep_dir=sweep_dir))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:  # noqa: D102
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
        self._forget_ledger()

    def on_job_start(self, config: Any, **kwargs: Any) -> None:  # noqa: D102
        if threading.current_thread() is not threading.main_thread():
            return
        in_worker = sweep_ledger()
        ledger = in_worker or self._ledger
        if ledger is None:
            return
        if in_worker is not None:  # a worker process: signals are noted between runs, not fatal
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) is not _note_stop:
                    signal.signal(signum, _note_stop)
            (ledger / str(os.getpid())).touch()
            if _STOPPING:
                code = 128 + _STOPPING[0]
                print(f"interrupted: {signal.Signals(_STOPPING[0]).name} received; job "
                      f"{OmegaConf.select(config, 'hydra.job.num')} does not start", file=sys.stderr, flush=True)
                raise SystemExit(code)
        (ledger / f"job-{OmegaConf.select(config, 'hydra.job.num')}").touch()

    def _forget_ledger(self) -> None:
        for key in (SWEEP_PARENT_ENV, SWEEP_LEDGER_ENV):
            os.environ.pop(key, None)
        if self._ledger is not None:
            shutil.rmtree(self._ledger, ignore_errors=True)
            self._ledger = None

    def _ready(self) -> set[int]:
        """The workers that handle a signal (they have started a job)."""
        return {int(p.name) for p in self._ledger.iterdir() if p.name.isdigit()} if self._ledger else set()

    def _runs_open(self) -> list[int]:
        """The live workers that may have a run open."""
        import psutil

        notes = [p.name for p in self._ledger.iterdir() if p.name.endswith(".run")] if self._ledger else []
        return [int(n[:-4]) for n in notes if n[:-4].isdigit() and psutil.pid_exists(int(n[:-4]))]

    def _forward(self, signum: int, frame: Any, sweep_dir: str) -> None:
        import psutil

        for s in (signal.SIGINT, signal.SIGTERM):  # closing the workers is not to be cut short
            signal.signal(s, signal.SIG_IGN)
        name = signal.Signals(signum).name
        me = psutil.Process()
        print(f"interrupted: {name} received; passing it to the sweep's workers and waiting up to "
              f"{self.grace_s:.0f} s for them to close their runs", file=sys.stderr, flush=True)
        told: set[int] = set()
        deadline = time.monotonic() + self.grace_s
        while True:  # workers that start a job meanwhile are told too; they then start no run
            ready = self._ready()
            for worker in me.children(recursive=True):
                if worker.pid in ready and worker.pid not in told:
                    told.add(worker.pid)
                    with contextlib.suppress(psutil.Error):
                        worker.send_signal(signum)
            still_open = self._runs_open()
            if not still_open or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        stopped = 0
        for _ in range(50):  # every process below: workers, the pool's helpers, any the pool started meanwhile
            below = me.children(recursive=True)
            if not below:
                break
            for process in below:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            stopped += len(psutil.wait_procs(below, timeout=2)[0])
        started = len([p for p in self._ledger.iterdir() if p.name.startswith("job-")]) if self._ledger else 0
        left = (f"; {len(still_open)} workers did not close their runs within {self.grace_s:.0f} s and were killed "
                "(their runs stay RUNNING: heatmapbench-runs --close ends them)" if still_open else "")
        print(f"interrupted: the sweep stopped after {started} started jobs (folders in {sweep_dir}); jobs not "
              f"started did not run; {len(told)} workers told, {stopped} processes ended{left}",
              file=sys.stderr, flush=True)
        self._forget_ledger()
        os._exit(128 + signum)  # the launcher's pool is gone: its own shutdown would wait on dead workers


def end_reason(err: BaseException) -> str:
    """One line saying why a run ended early: ``SIGTERM received`` or ``ValueError: ...``."""
    if isinstance(err, RunInterrupted):
        return str(err)
    if isinstance(err, SystemExit):
        return f"exit status {err.code}"
    return one_line(err)


def end_run(logger: Any, status: str, reason: str | None = None) -> None:
    """End the logger's run with ``status`` (FINISHED, FAILED, KILLED) and a reason tag, if it exists."""
    run_id = getattr(logger, "_run_id", None)
    if run_id is None:  # the run was never created: nothing to close
        return
    if reason:
        retry_locked(logger.experiment.set_tag)(run_id, "end_reason", reason)
    retry_locked(logger.finalize)(status)


def status_of(err: BaseException) -> str:
    """The MLflow status of a run ended by ``err``: KILLED for signals and Ctrl+C, else FAILED."""
    return "KILLED" if isinstance(err, (RunInterrupted, KeyboardInterrupt)) else "FAILED"


#: The tag an open run refreshes (unix seconds) so that a run whose process died (SIGKILL, the OOM
#: killer, a lost node) can be told from one still working: ``heatmapbench-runs`` closes stale ones.
HEARTBEAT_TAG = "heartbeat"
HEARTBEAT_S = 60.0


@contextlib.contextmanager
def heartbeat(client: Any, run_id: str, every_s: float = HEARTBEAT_S, tag: str = HEARTBEAT_TAG) -> Iterator[None]:
    """While open, set the run's ``tag`` (:data:`HEARTBEAT_TAG`) to the time now, at once and every ``every_s``
    seconds, from a daemon thread (a store that fails a beat is tried again at the next)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # noqa: BLE001 - a missed beat only ages the tag
                retry_locked(client.set_tag, attempts=3)(run_id, tag, str(int(time.time())))
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=beat, name="heatmapbench-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@contextlib.contextmanager
def tracked_run(logger: Any, cfg: DictConfig, extra_tags: dict[str, str] | None = None, *,
                resumed: bool | None = None,
                end: Callable[[Any, str, str | None], None] = end_run) -> Iterator[Any]:
    """Open the logger's MLflow run, log the config, and close it FINISHED, FAILED or KILLED.

    From before the run is created until it is closed, SIGINT and SIGTERM raise
    :class:`RunInterrupted`; any exception (or signal) ends the run with an ``end_reason`` tag
    and propagates, so the entry point exits non-zero. A failure while closing is printed and
    does not hide the original error. When the logger was given the ``run_id`` of an earlier
    run (a resumed training), that run is reopened (status RUNNING) and logged into. While the
    run is open its :data:`HEARTBEAT_TAG` is refreshed every minute (:func:`heartbeat`).

    ``resumed``: whether the run existed before this process (None: whether the logger was given a
    ``run_id``). ``end(logger, status, reason)`` closes the run (:func:`end_run`); a run shared by
    several processes passes one that closes it only when the last of them ends.
    """
    with (interrupts_raise() as interrupts, _marked_open(),  # _marked_open: a sweep worker's note for its parent
          space_reserve(str(getattr(logger, "_tracking_uri", "") or "")) as free_reserve):
        try:
            if resumed is None:
                resumed = getattr(logger, "_run_id", None) is not None
            with store_lock(str(getattr(logger, "_tracking_uri", "") or "")):  # store prepared by make_logger
                retry_locked(lambda: logger.experiment)()  # creates the experiment and the run
            if resumed:
                retry_locked(logger.experiment.update_run)(logger.run_id, status="RUNNING")
            log_config(logger, cfg, extra_tags, resumed=resumed)
            with heartbeat(logger.experiment, logger.run_id):
                yield logger
            interrupts.check()  # a signal whose exception was lost ends the run KILLED all the same
            interrupts.closing = True  # a signal now is raised once the run is closed (FINISHED: it is complete)
            end(logger, "FINISHED", None)
        except BaseException as err:
            interrupts.closing = True  # signals are ignored from here on: closing is not to be cut short
            quick = HTTP_LAST_TRY if isinstance(err, LoggingFailedError) else {}
            if disk_full(err):
                free_reserve()  # room for the store to record FAILED
            try:
                with temporary_environ(quick):  # the server already failed: one short try to mark the run
                    end(logger, status_of(err), end_reason(err))
            except Exception as close_err:  # noqa: BLE001 - the original error matters more
                print(f"warning: could not mark the MLflow run {status_of(err)}: {end_reason(close_err)}",
                      file=sys.stderr, flush=True)
            raise
        if interrupts.late is not None:  # a signal while the run was closed FINISHED: stop now
            raise RunInterrupted(interrupts.late)
