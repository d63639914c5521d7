"""Where to look in the MLflow UI: links to the "Model training" view of the project's experiments.

MLflow 3 opens an experiment in its GenAI view unless the URL asks for the model-training one
(``?workflowType=machine_learning``); ``make ui`` prints these links before serving the store.

    python -m heatmapbench.app.ui --tracking-uri sqlite:///$PWD/mlruns/mlflow.db --port 5000
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from urllib.parse import quote

#: The query parameter MLflow 3's UI reads to pick the "Model training" view (not "GenAI apps & agents").
TRAINING_VIEW = "workflowType=machine_learning"


def experiment_url(base: str, experiment_id: str) -> str:
    """The runs table of one experiment, in the model-training view."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def compare_url(base: str, experiment_ids: list[str]) -> str:
    """The runs of several experiments side by side, in the model-training view."""
    ids = quote(json.dumps([str(i) for i in experiment_ids], separators=(",", ":")))
    return f"{base.rstrip('/')}/#/compare-experiments/s?experiments={ids}&{TRAINING_VIEW}"


def training_view_urls(tracking_uri: str, base: str) -> list[tuple[str, str]]:
    """``(label, url)`` for every experiment in the store with runs (newest first), plus one to compare them all."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e for e in client.search_experiments() if e.name != "Default" or client.search_runs(
        [e.experiment_id], max_results=1)]
    experiments.sort(key=lambda e: e.last_update_time or 0, reverse=True)
    links = [(e.name, experiment_url(base, e.experiment_id)) for e in experiments]
    if len(experiments) > 1:
        links.append(("all of them", compare_url(base, [e.experiment_id for e in experiments])))
    return links


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
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
