"""Where to look in the MLflow UI: links to the "Model training" view of the project's experiments.

MLflow 3 opens an experiment in its GenAI view unless the URL asks for the model-training one
(``?workflowType=machine_learning``) or the user has clicked *Model training* at the top of the
left sidebar once, which the UI remembers in the browser. A page reached by clicking around
(a run opened from the runs table) carries no such parameter, so until that click it falls back to
the GenAI view. ``make ui`` prints, before serving the store, a link to each experiment, to its
newest run and to that run's key figure, all in the model-training view, and says how to keep it.

MLflow orders chart sections by metric name, which puts raw ``aopc`` before ``aopc_rel`` and ``val`` near
the end. So before the links ``make ui`` saves on each experiment a chart view that leads with the answer
(:func:`publish_views`): an experiment tag that MLflow 3.17's UI lists under *Views* and opens from the
first links printed (:func:`view_url`).

    python -m heatmapbench.app.ui --tracking-uri sqlite:///$PWD/mlruns/mlflow.db --port 5000
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable
from urllib.parse import quote

from heatmapbench.app.store import one_line, retry_locked, store_exists

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
#: The name MLflow 3's UI gives the section of ``system/`` metrics.
SYSTEM_METRICS = "System metrics"
#: The sections a reader should see first, in this order: AOPC relative to the random ordering, the
#: validation accuracy it moves with (with a point at step 0, before training), the accuracy the AOPC
#: callback compared with, the other unconfounded comparisons of an evaluation (ABPC, how often an
#: explainer beats the random ordering), ROAR's and KAR's retrained accuracies, and the model-randomisation
#: test's similarity.
ANSWER_SECTIONS = ("aopc_rel", "val", "eval", "abpc", "beats_random", "roar", "kar", "sanity/mprt")

#: The chart view ``make ui`` keeps on every experiment: the experiment tag ``mlflow.sharedViewState.<key>``,
#: which MLflow 3's UI opens for ``?viewStateShareKey=<key>`` (its own *Share* button writes such tags).
VIEW_KEY = "heatmapbench-answer-first"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
#: The view's name in the UI's *Views* list (MLflow 3.17 lists every such tag whose value is a named envelope).
VIEW_NAME = "Answer first (heatmapbench)"
#: MLflow's limit on an experiment tag's value.
_MAX_TAG_VALUE = 20_000


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


def section_of(key: str) -> str:
    """The chart section MLflow 3's UI puts a metric in: its name up to the last ``/``."""
    if key.startswith("system/"):
        return SYSTEM_METRICS
    return key.rsplit("/", 1)[0] if "/" in key else MODEL_METRICS


def answer_first_sections(metric_keys: Iterable[str]) -> list[tuple[str, bool]]:
    """``(section, open)`` in the order the answer-first view shows them: :data:`ANSWER_SECTIONS` first and
    open, then every other section in MLflow's own order (:func:`chart_sections`), closed; *System metrics*
    last."""
    keys = list(metric_keys)
    present = {section_of(k) for k in keys}
    first = [s for s in ANSWER_SECTIONS if s in present]
    rest = [s for s in chart_sections(keys) if s not in first]
    system = [SYSTEM_METRICS] if SYSTEM_METRICS in present else []
    return [(s, True) for s in first] + [(s, False) for s in rest + system]


def answer_first_view(metric_keys: Iterable[str]) -> dict:
    """The shared view state (the JSON of an ``mlflow.sharedViewState.<key>`` experiment tag) that opens an
    experiment's chart view on :func:`answer_first_sections`.

    Only the sections are given, with ``isAccordionReordered`` so the UI keeps their order; the charts
    are left empty, and the UI adds one per metric into its section (``updateChartAndSectionConfigs`` in
    MLflow 3.17's bundle), as it does for a metric first logged while the page is open. Charts of
    metrics the runs shown do not have are hidden.
    """
    sections = [{"uuid": f"hb-{i}", "name": name, "display": is_open, "isReordered": False}
                for i, (name, is_open) in enumerate(answer_first_sections(metric_keys))]
    return {"compareRunCharts": [], "compareRunSections": sections, "isAccordionReordered": True,
            "hideEmptyCharts": True}


def view_tag_value(metric_keys: Iterable[str], created_at: int, updated_at: int) -> str:
    """The value of :data:`VIEW_TAG`: the envelope MLflow 3.17's *Save view* writes (``name``, ``createdAt``,
    ``updatedAt`` in ms, ``state`` the view as a JSON string), so the view is listed by name under *Views*.
    Closed sections are dropped from the end while the value exceeds MLflow's tag limit (the UI adds a
    section it is not given after the others)."""
    view = answer_first_view(metric_keys)
    while True:
        value = json.dumps({"name": VIEW_NAME, "createdAt": created_at, "updatedAt": updated_at,
                            "state": json.dumps(view, separators=(",", ":"))}, separators=(",", ":"))
        closed = [i for i, section in enumerate(view["compareRunSections"]) if not section["display"]]
        if len(value) <= _MAX_TAG_VALUE or not closed:
            return value
        del view["compareRunSections"][closed[-1]]


def _view_state(value: str | None) -> dict | None:
    try:
        return json.loads(json.loads(value)["state"]) if value else None
    except (ValueError, KeyError, TypeError):
        return None


def publish_views(tracking_uri: str, max_runs: int = 10_000) -> list[tuple[str, str]]:
    """Write (or refresh) the answer-first view on every experiment of the store that has runs, from the
    metric names its runs (at most ``max_runs`` each) have logged; ``(experiment name, id)`` of each.

    A view whose sections are unchanged is left as it is; one the user saved under another name is never
    touched. Raises what the store raises (MlflowException, OSError) when it cannot be written.
    """
    if not store_exists(tracking_uri):
        return []
    import time

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    done = []
    for experiment in _experiments(client):
        keys: set[str] = set()
        token = None
        seen = 0
        while seen < max_runs:
            page = client.search_runs([experiment.experiment_id], max_results=min(1000, max_runs - seen),
                                      page_token=token)
            for run in page:
                keys.update(run.data.metrics)
            seen += len(page)
            token = page.token
            if not token:
                break
        if not seen:
            continue
        old = experiment.tags.get(VIEW_TAG)
        now = int(time.time() * 1000)
        try:
            created = int(json.loads(old)["createdAt"]) if old else now
        except (ValueError, KeyError, TypeError):
            created = now
        value = view_tag_value(keys, created, now)
        if old is None or _view_state(old) != _view_state(value):
            retry_locked(client.set_experiment_tag)(experiment.experiment_id, VIEW_TAG, value)
        done.append((experiment.name, experiment.experiment_id))
    return done


def view_url(base: str, experiment_id: str) -> str:
    """An experiment's runs in the chart view, opened on the answer-first view (:data:`VIEW_KEY`)."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
            f"&compareRunsMode=CHART&{TRAINING_VIEW}")


def answer_hint(metric_keys: Iterable[str]) -> str | None:
    """One line on where ``aopc_rel`` and ``val`` sit in a run's own Model metrics tab and how to see them first."""
    sections = chart_sections(metric_keys)
    found = [(s, sections.index(s) + 1) for s in ANSWER_SECTIONS[:2] if s in sections]
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
    width = max(len(label) for label, _ in links)
    from mlflow.exceptions import MlflowException

    try:
        views = publish_views(args.tracking_uri)
    except (MlflowException, OSError) as err:  # the store refused the tag: the links below still work
        views = []
        print(f"note: could not save the answer-first chart view ({one_line(err)}); the links below open "
              "MLflow's default layout")
    if views:
        print("Start here: each experiment's runs as charts, AOPC relative to random and accuracy first "
              f"(the view '{VIEW_NAME}' under Views):")
        for name, eid in views:
            print(f"  {name:<{width}}  {view_url(base, eid)}")
    print("MLflow UI, Model training view (open once the server below is up):")
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
