"""Check, in headless Chromium, that MLflow's UI shows sections in the order ``make ui`` says.

Two checks on a temporary store with heatmapbench's metric names (and one upper-case prefix, which sorts
first by code point), served with ``mlflow ui``:

- a run's *Model metrics* tab: ``heatmapbench.app.ui.chart_sections`` mirrors MLflow 3's rule (sections
  by metric-name prefix, sorted, names without ``/`` last), and ``make ui`` prints where ``aopc_rel`` and
  ``val`` sit by it;
- the answer-first chart view ``make ui`` saves on each experiment (``publish_views``): opened with its
  link, the runs' charts must show ``answer_first_sections`` in order, the answer's sections open and
  the others closed, and the view must be listed by name under *Views*.

Exit status 1 when MLflow's UI differs (then update ``heatmapbench.app.ui``).

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
#: A chart's title is its metric's name after the section's: one of each section, to tell open from closed.
PROBES = {"aopc_rel": "aopc_rel/lrp_epsilon_0.01", "val": "val/acc", "aopc": "aopc/lrp_epsilon_0.01",
          "Zeta": "Zeta/x"}


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

    from heatmapbench.app.ui import VIEW_NAME, answer_first_sections, chart_sections, publish_views, run_url, view_url

    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{tmp}/mlflow.db"
        client = MlflowClient(store)
        eid = client.create_experiment("sections", artifact_location=f"{tmp}/artifacts")
        run = client.create_run(eid, run_name="sections").info.run_id
        for step in range(3):
            for key in KEYS:
                client.log_metric(run, key, 0.1 * step, step=step)
        client.set_terminated(run)
        publish_views(store)
        port = free_port()
        server = serve(store, Path(tmp) / "artifacts", port)
        base = f"http://127.0.0.1:{port}"
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                context.add_init_script(QUIET)
                page = context.new_page()
                page.set_default_timeout(180_000)
                page.goto(run_url(base, eid, run).replace("?", "/model-metrics?"))
                page.get_by_placeholder("Search metric charts").wait_for()
                page.wait_for_timeout(8000)
                seen = sections_in_page(page.inner_text("body"))
                page.goto(view_url(base, eid))
                page.get_by_placeholder("Search metric charts").wait_for()
                page.wait_for_timeout(8000)
                body = page.inner_text("body")
                view_seen = sections_in_page(body)
                titles = {line.strip() for line in body.splitlines()}
                open_seen = {section for section, title in PROBES.items() if title in titles}
                page.get_by_test_id("saved-views-trigger").click(force=True)
                page.wait_for_timeout(2000)
                listed = VIEW_NAME in page.inner_text("body")
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
    expected = chart_sections(KEYS)
    print("Model metrics tab, MLflow shows: ", ", ".join(seen))
    print("chart_sections:                  ", ", ".join(expected))
    wanted = answer_first_sections(KEYS)
    print("answer-first view, MLflow shows: ", ", ".join(view_seen))
    print("answer_first_sections:           ", ", ".join(name for name, _ in wanted))
    wanted_open = {name for name, is_open in wanted if is_open} & set(PROBES)
    print(f"open sections among {sorted(PROBES)}: {sorted(open_seen)} (expected {sorted(wanted_open)}); "
          f"listed under Views: {listed}")
    failed = False
    if seen != expected:
        print("error: MLflow's UI orders the Model metrics tab otherwise; update heatmapbench.app.ui.chart_sections")
        failed = True
    if view_seen != [name for name, _ in wanted] or open_seen != wanted_open or not listed:
        print("error: MLflow's UI shows the answer-first view otherwise; update heatmapbench.app.ui.answer_first_view")
        failed = True
    if failed:
        return 1
    print("same order")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
