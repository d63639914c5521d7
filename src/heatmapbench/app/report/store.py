"""Reading runs from the MLflow store for ``heatmapbench-report``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import urlparse

import pandas as pd

from heatmapbench.app.schema import ConfigError
from heatmapbench.evaluation.reliability import PER_IMAGE_STEM, read_table
from heatmapbench.app.store import retry_locked, store_exists

#: Where ``heatmapbench-evaluate`` logs its tables in a run's artifacts.
PER_IMAGE_FOLDER = "evaluation"


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def _tag_key(key: str) -> str:
    return f"tags.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"tags.`{key}`"


def filter_string(sweep_id: str | None = None, tags: dict[str, Any] | None = None, raw: str | None = None) -> str:
    """One MLflow search filter (clauses joined by ``and``) from a sweep id, tag equalities and a raw filter."""
    parts = []
    if sweep_id:
        parts.append(f"tags.sweep_id = {_quote(str(sweep_id))}")
    for key, value in (tags or {}).items():
        parts.append(f"{_tag_key(str(key))} = {_quote(str(value))}")
    if raw:
        parts.append(str(raw))
    return " and ".join(parts)


def runs_frame(runs: Iterable[Any], experiment_names: dict[str, str] | None = None) -> pd.DataFrame:
    """MLflow runs as the frame ``mlflow.search_runs(output_format="pandas")`` returns, plus ``experiment``."""
    rows = []
    for run in runs:
        row = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
               "experiment": (experiment_names or {}).get(run.info.experiment_id, run.info.experiment_id),
               "status": run.info.status, "artifact_uri": run.info.artifact_uri,
               "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True)}
        row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
        row.update({f"params.{k}": v for k, v in run.data.params.items()})
        row.update({f"tags.{k}": v for k, v in run.data.tags.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def load_runs(tracking_uri: str, experiments: Sequence[str] | None, *, sweep_id: str | None = None,
              tags: dict[str, Any] | None = None, filter: str | None = None, include_failed: bool = False,
              exclude_experiment: str | None = None) -> pd.DataFrame:
    """The selected runs of ``experiments`` (all but ``exclude_experiment`` when empty) as a frame.

    Raises ``ConfigError`` (nothing is written to the store) when the store or an experiment does
    not exist, the filter is not valid MLflow syntax, or no run matches.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not store_exists(tracking_uri):
        raise ConfigError(f"tracking_uri={tracking_uri!r} is invalid: no MLflow store there; run heatmapbench-evaluate "
                          "or heatmapbench-train first, or point tracking_uri (or paths.mlruns_dir) at the store")
    client = MlflowClient(tracking_uri=tracking_uri)
    known = {e.name: e.experiment_id for e in retry_locked(client.search_experiments)()}
    if experiments:
        unknown = [name for name in experiments if name not in known]
        if unknown:
            raise ConfigError(f"experiments={list(experiments)} is invalid: no experiment {unknown} in {tracking_uri}; "
                              f"known: {sorted(known)}")
        names = list(experiments)
    else:
        names = [name for name in known if name != exclude_experiment]
    query = filter_string(sweep_id, tags, filter)
    ids = [known[name] for name in names]
    try:
        runs = []
        token = None
        while True:  # pages of 1000 runs
            page = retry_locked(client.search_runs)(ids, filter_string=query, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    except MlflowException as err:
        raise ConfigError(f"filter {query!r} is invalid: {err.message}. MLflow syntax: clauses joined by 'and', e.g. "
                          "tags.model = 'vgg16' and metrics.`eval/accuracy` > 0.5 and params.`evaluation.steps` = '100'") from err
    df = runs_frame(runs, {v: k for k, v in known.items()})
    if len(df) and "tags.task" in df:
        df = df[df["tags.task"].fillna("") != "report"]  # earlier summaries are not runs to compare
    where = f"experiments {names}" + (f" with filter {query!r}" if query else "")
    if not len(df):
        raise ConfigError(f"no runs match in {where} ({tracking_uri}); check sweep_id/tags/filter/experiments")
    if not include_failed:
        kept = df[df.status == "FINISHED"]
        if not len(kept):
            raise ConfigError(f"no FINISHED runs match in {where} ({left_out_note(df)}); include_failed=true "
                              "reports them anyway")
        if len(kept) < len(df):
            print(f"note: left out {len(df) - len(kept)} of {len(df)} selected runs that did not finish "
                  f"({left_out_note(df[df.status != 'FINISHED'])}); include_failed=true reports them"
                  + ("; heatmapbench-runs --close closes stale RUNNING ones" if "stale" in left_out_note(df) else ""),
                  flush=True)
        df = kept
    return df.reset_index(drop=True)


def left_out_note(df: pd.DataFrame, now: float | None = None) -> str:
    """``"2 FAILED, 1 RUNNING (1 stale: no heartbeat for over 10 min)"``: the statuses of ``df``'s runs."""
    import time

    from heatmapbench.app.runs import STALE_AFTER_MIN
    from heatmapbench.app.tracking import HEARTBEAT_TAG

    now = time.time() if now is None else now
    parts = []
    for status, n in df.status.value_counts().items():
        text = f"{n} {status}"
        if status == "RUNNING":
            beat = pd.to_numeric(df.get(f"tags.{HEARTBEAT_TAG}"), errors="coerce") if f"tags.{HEARTBEAT_TAG}" in df \
                else pd.Series(float("nan"), index=df.index)
            started = (pd.to_datetime(df.start_time, utc=True) - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
            seen = beat.fillna(started)[df.status == "RUNNING"]
            stale = int(((now - seen) / 60 > STALE_AFTER_MIN).sum())
            if stale:
                text += f" ({stale} stale: no heartbeat for over {STALE_AFTER_MIN:g} min)"
        parts.append(text)
    return ", ".join(parts)


def _local_dir(artifact_uri: str) -> Path | None:
    """The folder of a local artifact URI (a path or ``file://``), else None."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else artifact_uri)
    return None


def read_run_table(artifact_uri: str, names: Sequence[str]) -> pd.DataFrame | None:
    """The first of the artifact tables ``names`` (Parquet or CSV, by suffix) a run has, else None."""
    local = _local_dir(artifact_uri)
    for name in names:
        if local is not None:
            if (local / name).is_file():
                return read_table(local / name)
            continue
        import mlflow
        from mlflow.exceptions import MlflowException

        try:  # a remote store: one small file per run
            return read_table(mlflow.artifacts.download_artifacts(artifact_uri=f"{artifact_uri}/{name}"))
        except (MlflowException, OSError):
            continue
    return None


def _read_per_image(artifact_uri: str) -> pd.DataFrame | None:
    return read_run_table(artifact_uri, [f"{PER_IMAGE_FOLDER}/{PER_IMAGE_STEM}.parquet",
                                         f"{PER_IMAGE_FOLDER}/{PER_IMAGE_STEM}.csv"])


def per_image_tables(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The per-image AOPC tables of ``runs`` (one ``run_id`` and ``artifact_uri`` per row) joined, with
    a ``run_id`` column, and the ids of runs that have none (evaluated before the table existed)."""
    frames, missing = [], []
    for run_id, uri in runs[["run_id", "artifact_uri"]].drop_duplicates("run_id").itertuples(index=False):
        table = _read_per_image(str(uri))
        if table is None:
            missing.append(run_id)
        else:
            frames.append(table.assign(run_id=run_id))
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), missing
