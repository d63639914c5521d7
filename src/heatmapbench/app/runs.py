"""``heatmapbench-runs``: find and close the runs a dead process left RUNNING.

    heatmapbench-runs                                  # list RUNNING runs; stale ones marked
    heatmapbench-runs --close                          # mark the stale ones KILLED, with end_reason
    heatmapbench-runs --tracking-uri http://host:5000 --stale-after 30

A run closes itself on an exception or SIGINT/SIGTERM (:func:`~heatmapbench.app.tracking.tracked_run`),
but not when its process is killed outright (SIGKILL, the OOM killer, a lost node, a power cut).
Every open run refreshes its ``heartbeat`` tag once a minute; a RUNNING run whose heartbeat (or,
for runs made before the tag existed, whose start) is older than ``--stale-after`` minutes has no
process behind it. ``--close`` marks such runs KILLED with ``end_reason`` saying so; runs still
beating are never touched.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

from heatmapbench.app.store import retry_locked, store_exists
from heatmapbench.app.tracking import HEARTBEAT_TAG

#: Minutes without a heartbeat after which a RUNNING run counts as stale (ten missed beats).
STALE_AFTER_MIN = 10.0


@dataclass
class OpenRun:
    """A RUNNING run and how long ago its process last said it was alive."""

    run_id: str
    experiment: str
    name: str
    last_seen: float  # unix seconds: the heartbeat, else the start
    beating: bool  # whether it has a heartbeat tag at all

    def silent_min(self, now: float) -> float:
        return (now - self.last_seen) / 60.0


def open_runs(client: Any) -> list[OpenRun]:
    """Every RUNNING run of every experiment in the store, oldest heartbeat first."""
    from mlflow.entities import ViewType

    experiments = {e.experiment_id: e.name for e in retry_locked(client.search_experiments)(view_type=ViewType.ALL)}
    found: list[OpenRun] = []
    token = None
    while experiments:
        page = retry_locked(client.search_runs)(list(experiments), filter_string="attributes.status = 'RUNNING'",
                                                max_results=1000, page_token=token)
        for run in page:
            beat = run.data.tags.get(HEARTBEAT_TAG)
            found.append(OpenRun(run.info.run_id, experiments.get(run.info.experiment_id, "?"),
                                 run.info.run_name or "", float(beat) if beat else run.info.start_time / 1000.0,
                                 beat is not None))
        token = page.token
        if not token:
            break
    return sorted(found, key=lambda r: r.last_seen)


def stale_runs(runs: Sequence[OpenRun], stale_after_min: float = STALE_AFTER_MIN,
               now: float | None = None) -> list[OpenRun]:
    """The runs of ``runs`` silent for longer than ``stale_after_min`` minutes."""
    now = time.time() if now is None else now
    return [r for r in runs if r.silent_min(now) > stale_after_min]


def close_stale(client: Any, runs: Sequence[OpenRun], now: float | None = None) -> None:
    """Mark ``runs`` KILLED, each with an ``end_reason`` naming when it was last seen alive."""
    now = time.time() if now is None else now
    for run in runs:
        seen = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(run.last_seen))
        what = "heartbeat" if run.beating else "start (no heartbeat tag)"
        retry_locked(client.set_tag)(run.run_id, "end_reason",
                                     f"stale: its process stopped without closing it (SIGKILL, the OOM killer, a "
                                     f"lost node?); last {what} {seen}, {run.silent_min(now):.0f} min before "
                                     "heatmapbench-runs --close")
        retry_locked(client.set_terminated)(run.run_id, status="KILLED", end_time=int(run.last_seen * 1000))


def main(argv: Sequence[str] | None = None) -> int:
    """The command: list the open runs, and with ``--close`` mark the stale ones KILLED."""
    from mlflow import MlflowClient

    from heatmapbench.registry import project_root

    parser = argparse.ArgumentParser(prog="heatmapbench-runs", description=__doc__.split("\n\n")[0].strip("`: \n"))
    parser.add_argument("--tracking-uri", default=f"sqlite:///{project_root()}/mlruns/mlflow.db",
                        help="the store (default: the project's sqlite store)")
    parser.add_argument("--stale-after", type=float, default=STALE_AFTER_MIN, metavar="MIN",
                        help=f"minutes without a heartbeat that make a RUNNING run stale (default {STALE_AFTER_MIN:g})")
    parser.add_argument("--close", action="store_true", help="mark the stale runs KILLED with an end_reason tag")
    args = parser.parse_args(argv)
    if args.stale_after < 2:  # two missed beats at least: a working run is never closed
        parser.error(f"--stale-after={args.stale_after:g} is invalid: use at least 2 (minutes; a run beats every minute)")
    uri = args.tracking_uri
    if not store_exists(uri):
        parser.error(f"--tracking-uri={uri}: no such store")
    client = MlflowClient(uri)
    now = time.time()
    runs = open_runs(client)
    stale = stale_runs(runs, args.stale_after, now)
    ids = {r.run_id for r in stale}
    for run in runs:
        state = "STALE" if run.run_id in ids else "alive"
        print(f"{state:5}  {run.run_id}  silent {run.silent_min(now):6.1f} min  {run.experiment}  {run.name}")
    print(f"{len(runs)} RUNNING runs in {uri}, {len(stale)} stale (silent > {args.stale_after:g} min)"
          + ("" if args.close or not stale else "; heatmapbench-runs --close marks them KILLED"))
    if args.close and stale:
        close_stale(client, stale, now)
        print(f"marked {len(stale)} runs KILLED (tag end_reason says why)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
