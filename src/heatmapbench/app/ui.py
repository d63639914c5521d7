"""Where to look in the MLflow UI: links to the "Model training" view of the project's experiments.

MLflow 3 opens an experiment in its GenAI view unless the URL asks for the model-training one
(``?workflowType=machine_learning``) or the user has clicked *Model training* at the top of the
left sidebar once, which the UI remembers in the browser. A page reached by clicking around
(a run opened from the runs table) carries no such parameter, so until that click it falls back to
the GenAI view. ``make ui`` prints, before serving the store, a link to each experiment, to its
newest run and to that run's key figure, all in the model-training view, and says how to keep it.

    python -m heatmapbench.app.ui --tracking-uri sqlite:///$PWD/mlruns/mlflow.db --port 5000
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable
from urllib.parse import quote

from heatmapbench.app.store import store_exists

#: The query parameter MLflow 3's UI reads to pick the "Model training" view (not "GenAI apps & agents").
TRAINING_VIEW = "workflowType=machine_learning"


def experiment_url(base: str, experiment_id: str) -> str:
    """The runs table of one experiment, in the model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page, in the model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def artifact_url(base: str, experiment_id: str, run_id: str, path: str) -> str:
    """One artifact of a run (e.g. a figure) opened in the run's Artifacts tab, in the model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{quote(path)}?{TRAINING_VIEW}"


#: The figure a user looks at first, by the kind of run: training, evaluation, report.
KEY_FIGURES = ("aopc/accuracy_vs_aopc.png", "evaluation/aopc_curves.png", "report/aopc_vs_region_size.png",
               "report/rank_per_setting.png")

#: Printed with the links: how to make the UI keep the model-training view.
KEEP_VIEW = ("These links open MLflow's Model training view. To keep it, click 'Model training' at the top of "
             "the left sidebar once: the UI remembers it in this browser. Until then a page opened by clicking "
             "around (a run from the runs table) falls back to the GenAI view.")


#: The name MLflow 3's UI gives the section of metrics whose names have no ``/``.
MODEL_METRICS = "Model metrics"
#: The sections a reader should see first: the unconfounded measure and the accuracy it moves with.
ANSWER_SECTIONS = ("aopc_rel", "val")


def chart_sections(metric_keys: Iterable[str]) -> list[str]:
    """The sections of a run's *Model metrics* tab, in the order MLflow 3's UI first shows them.

    The UI (``RunsChartsCardConfig.getBaseChartAndSectionConfigs``; the same in the bundle MLflow
    3.17 serves) makes one section per metric-name prefix, the name up to its last ``/``, sorts them
    by code point, then puts *Model metrics* (names without ``/``) and *System metrics*
    (``system/``) last; charts in a section are sorted by name. Nothing on the server changes that
    order but the names; a reader's own rearrangement is kept in the browser, per run.
    """
    sections = {key.rsplit("/", 1)[0] if "/" in key else MODEL_METRICS
                for key in metric_keys if not key.startswith("system/")}
    return sorted(s for s in sections if s != MODEL_METRICS) + ([MODEL_METRICS] if MODEL_METRICS in sections else [])


def answer_hint(metric_keys: Iterable[str]) -> str | None:
    """One line on where :data:`ANSWER_SECTIONS` sit in a run's Model metrics tab and how to see them first."""
    sections = chart_sections(metric_keys)
    found = [(s, sections.index(s) + 1) for s in ANSWER_SECTIONS if s in sections]
    if not found:
        return None
    where = ", ".join(f"{s} is section {i} of {len(sections)}" for s, i in found)
    return (f"A run's Model metrics tab sorts its chart sections alphabetically by metric prefix ({where} in the "
            f"newest such run): type {' or '.join(s + '/' for s, _ in found)} in 'Search metric charts' to see "
            "them first.")


def compare_url(base: str, experiment_ids: list[str]) -> str:
    """The runs of several experiments side by side, in the model-training view."""
    ids = quote(json.dumps([str(i) for i in experiment_ids], separators=(",", ":")))
    return f"{base.rstrip('/')}/#/compare-experiments/s?experiments={ids}&{TRAINING_VIEW}"


def training_view_urls(tracking_uri: str, base: str) -> list[tuple[str, str]]:
    """``(label, url)`` for every experiment in the store with runs (newest first), plus one to compare them all."""
    if not store_exists(tracking_uri):
        return []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = _experiments(client)
    links = [(e.name, experiment_url(base, e.experiment_id)) for e in experiments]
    if len(experiments) > 1:
        links.append(("all of them", compare_url(base, [e.experiment_id for e in experiments])))
    return links


def _experiments(client) -> list:
    experiments = [e for e in client.search_experiments() if e.name != "Default" or client.search_runs(
        [e.experiment_id], max_results=1)]
    return sorted(experiments, key=lambda e: e.last_update_time or 0, reverse=True)


def newest_run_urls(tracking_uri: str, base: str) -> list[tuple[str, str, str | None]]:
    """``(experiment, run url, key figure url or None)`` of each experiment's newest run, in the
    model-training view; the key figure is the first of :data:`KEY_FIGURES` the run holds."""
    if not store_exists(tracking_uri):
        return []
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    out = []
    for experiment in _experiments(client):
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            continue
        run = runs[0].info
        figure = None
        try:
            folders: dict[str, set[str]] = {}
            for path in KEY_FIGURES:
                folder = path.rsplit("/", 1)[0]
                if folder not in folders:
                    folders[folder] = {f.path for f in client.list_artifacts(run.run_id, folder)}
                if path in folders[folder]:
                    figure = artifact_url(base, experiment.experiment_id, run.run_id, path)
                    break
        except (OSError, MlflowException):  # artifacts not listable from here: the run link still helps
            figure = None
        out.append((experiment.name, run_url(base, experiment.experiment_id, run.run_id), figure))
    return out


def newest_answer_hint(tracking_uri: str) -> str | None:
    """:func:`answer_hint` for the newest of the store's runs (at most 50 looked at) that logged ``aopc_rel/``."""
    if not store_exists(tracking_uri):
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    ids = [e.experiment_id for e in _experiments(client)]
    runs = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=50) if ids else []
    for run in runs:
        if any(key.startswith(f"{ANSWER_SECTIONS[0]}/") for key in run.data.metrics):
            return answer_hint(run.data.metrics)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    base = f"http://{args.host}:{args.port}"
    links = training_view_urls(args.tracking_uri, base)
    if not links:
        print(f"No runs in {args.tracking_uri} yet (make demo first). The UI: {base}/#/experiments?{TRAINING_VIEW}")
        return 0
    print("MLflow UI, Model training view (open once the server below is up):")
    width = max(len(label) for label, _ in links)
    for label, url in links:
        print(f"  {label:<{width}}  {url}")
    newest = newest_run_urls(args.tracking_uri, base)
    if newest:
        print("Newest run of each experiment, and its key figure:")
        for name, run, figure in newest:
            print(f"  {name:<{width}}  {run}")
            if figure:
                print(f"  {'':<{width}}  {figure}")
    print(KEEP_VIEW)
    hint = newest_answer_hint(args.tracking_uri)
    if hint:
        print(hint)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
