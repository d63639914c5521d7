"""Check, in headless Chromium, that MLflow's UI orders a run's Model metrics tab as ``make ui`` says.

``heatmapbench.app.ui.chart_sections`` mirrors the rule of MLflow 3's UI (sections by metric-name
prefix, sorted, names without ``/`` last), and ``make ui`` prints where ``aopc_rel`` and ``val`` sit
by it. This script logs a run with heatmapbench's metric names (and one upper-case prefix, which sorts
first by code point) into a temporary store, serves it with ``mlflow ui``, opens the run's Model
metrics tab, reads the section headers in page order and compares. Exit status 1 when MLflow's order
differs (then update ``chart_sections``).

    pip install -e '.[screenshots]'             # Playwright; the browser is the system's chromium
    python scripts/ui_sections.py
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ui_screenshots import QUIET, free_port, serve  # noqa: E402

EXPLAINERS = ("lrp_epsilon_0.01", "sensitivity_l2")
MEASURES = ("aopc", "aopc_lo", "aopc_hi", "aopc_rel", "aopc_rel_lo", "aopc_rel_hi", "aopc_norm", "beats_random",
            "p_best", "complexity_png")
KEYS = ([f"{m}/{e}" for e in EXPLAINERS for m in MEASURES] + [f"corr_pearson/aopc_rel/{e}" for e in EXPLAINERS]
        + ["eval/accuracy", "eval/images", "eval/random_ordering/aopc", "eval/random_ordering/corr_pearson/aopc",
           "val/acc", "val/loss", "train/loss", "epoch", "Zeta/x"])


def sections_in_page(text: str) -> list[str]:
    """Section headers in page order: a line followed by a ``(<charts>)`` line."""
    lines = [line.strip() for line in text.splitlines()]
    return [name for name, count in zip(lines, lines[1:]) if name and re.fullmatch(r"\(\d+\)", count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args(argv)
    if not args.chromium:
        raise SystemExit("error: no chromium found; apt-get install chromium (or pass --chromium PATH)")
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    from heatmapbench.app.ui import chart_sections, run_url

    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        client = MlflowClient(store)
        eid = client.create_experiment("sections", artifact_location=f"{tmp}/artifacts")
        run = client.create_run(eid, run_name="sections").info.run_id
        for step in range(3):
            for key in KEYS:
                client.log_metric(run, key, 0.1 * step, step=step)
        client.set_terminated(run)
        port = free_port()
        server = serve(store, Path(tmp) / "artifacts", port)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                context.add_init_script(QUIET)
                page = context.new_page()
                page.set_default_timeout(180_000)
                page.goto(run_url(f"http://127.0.0.1:{port}", eid, run).replace("?", "/model-metrics?"))
                page.get_by_placeholder("Search metric charts").wait_for()
                page.wait_for_timeout(8000)
                seen = sections_in_page(page.inner_text("body"))
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
    expected = chart_sections(KEYS)
    print("MLflow shows: ", ", ".join(seen))
    print("chart_sections:", ", ".join(expected))
    if seen != expected:
        print("error: MLflow's UI orders the Model metrics tab otherwise; update heatmapbench.app.ui.chart_sections")
        return 1
    print("same order")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
