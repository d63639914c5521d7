"""Screenshots of the MLflow UI journey for the docs (docs/assets/ui/*.png), taken in headless Chromium.

    make demo                                   # a training run to look at (or any store with one)
    pip install -e '.[screenshots]'             # Playwright; the browser is the system's chromium
    python scripts/ui_screenshots.py            # serves mlruns/ on a free port and takes the shots
    python scripts/ui_screenshots.py --store sqlite:////tmp/x/mlruns/mlflow.db --experiment heatmapbench-demo

Each shot follows what the docs tell a user to do (``docs/how-to/mlflow-ui.md``), so when MLflow's UI
changes, this script fails at the step that no longer exists, or its pictures show what moved.
Charts are given a few seconds to draw.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "assets" / "ui"
#: MLflow's first-visit panels (assistant, guidance popovers) closed, as a returning user has them.
QUIET = """
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
localStorage.setItem('mlflow.detectIssues.guidanceShown_v1', 'true');
"""
SETTLE_MS = 4000  # charts draw after the data arrive


def small(path: Path) -> None:
    """Palette-quantise a screenshot in place (UI colours are few: a fraction of the bytes)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT)
    im.save(path, optimize=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(store: str, artifacts: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", store, "--default-artifact-root",
                               str(artifacts), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
            return server
        except OSError:
            if server.poll() is not None:
                raise SystemExit(f"error: mlflow ui exited with {server.returncode}") from None
            time.sleep(2)
    server.terminate()
    raise SystemExit("error: mlflow ui did not answer within 5 minutes")


def shoot(base: str, store: str, experiment: str, out: Path, chromium: str) -> list[Path]:
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    from heatmapbench.app.ui import artifact_url, publish_views, run_url, view_url

    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment {experiment!r} in {store}; run make demo first")
    run = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0].info
    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 800}, device_scale_factor=1)
        context.add_init_script(QUIET)
        page = context.new_page()
        page.set_default_timeout(180_000)

        def save(name: str, clip: dict | None = None) -> None:
            page.wait_for_timeout(SETTLE_MS)
            path = out / f"{name}.png"
            page.screenshot(path=str(path), clip=clip)
            small(path)
            shots.append(path)

        # 1. An experiment opened from the list: MLflow 3 shows its GenAI view.
        page.goto(f"{base}/#/experiments")
        page.get_by_text(experiment, exact=True).first.click()
        page.wait_for_url("**workflowType=genai**")
        save("1_genai_view")
        # 2. One click on "Model training" (top of the sidebar): the runs table, remembered from now on.
        page.get_by_text("Model training", exact=True).first.click()
        page.wait_for_url("**workflowType=machine_learning**")
        page.get_by_text(run.run_name[:20]).first.wait_for()
        save("2_model_training_runs")
        # 3. The runs as charts in the answer-first view make ui saves (AOPC relative to random, accuracy first).
        publish_views(store)
        page.goto(view_url(base, exp.experiment_id))
        page.get_by_placeholder("Search metric charts").wait_for()
        save("3_answer_first_view")
        # 4. The run's Model metrics tab, filtered to AOPC relative to random.
        page.goto(run_url(base, exp.experiment_id, run.run_id).replace("?", "/model-metrics?"))
        page.get_by_placeholder("Search metric charts").fill("aopc_rel/")
        save("4_model_metrics")
        # 5. A chart's ⋮ menu → Configure: the "Edit chart" dialog; the accuracy added beside AOPC.
        page.get_by_placeholder("Search metric charts").fill("aopc_rel/lrp_epsilon_0.01")
        page.wait_for_timeout(1000)
        page.locator("[data-testid='experiment-view-compare-runs-card-menu']").first.click()
        page.get_by_role("menuitem", name="Configure").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Edit chart").first.wait_for()
        dialog.get_by_role("combobox").last.click()
        page.keyboard.type("eval/accuracy")
        page.keyboard.press("Enter")
        page.keyboard.press("Escape") if page.get_by_role("listbox").count() else None
        save("5_edit_chart")
        page.keyboard.press("Escape")
        # 6. The key figure in the Artifacts tab.
        page.goto(artifact_url(base, exp.experiment_id, run.run_id, "aopc/accuracy_vs_aopc.png"))
        page.get_by_text("accuracy_vs_aopc.png").first.wait_for()
        save("6_key_figure")
        browser.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=f"sqlite:///{ROOT}/mlruns/mlflow.db")
    parser.add_argument("--artifacts", type=Path, help="default: mlruns/artifacts beside the sqlite store")
    parser.add_argument("--experiment", default="heatmapbench-demo")
    parser.add_argument("--url", help="an MLflow UI already serving the store (default: start one)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args(argv)
    if not args.chromium:
        raise SystemExit("error: no chromium found; apt-get install chromium (or pass --chromium PATH)")
    from heatmapbench.app.store import sqlite_path, store_exists

    if not store_exists(args.store):
        raise SystemExit(f"error: no store at {args.store}; run make demo first")
    db = sqlite_path(args.store)
    artifacts = args.artifacts or (db.parent if db is not None else ROOT / "mlruns") / "artifacts"
    OUT.mkdir(parents=True, exist_ok=True)
    server = None
    base = args.url
    if base is None:
        port = free_port()
        server = serve(args.store, artifacts, port)
        base = f"http://127.0.0.1:{port}"
    try:
        for path in shoot(base.rstrip("/"), args.store, args.experiment, OUT, args.chromium):
            print(f"{path.relative_to(ROOT)}: {path.stat().st_size // 1024} KB")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
