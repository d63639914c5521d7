"""``heatmapbench-evaluate`` end to end: pretrained nets, bundled samples, MLflow read-back, clean failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from heatmapbench.metrics import names as mn
from heatmapbench.app.evaluate import run_evaluate
from heatmapbench.models import zoo
from tests.helpers import cli_env, compose_config, run_main, store_uri

pytestmark = pytest.mark.slow

FAST = ["evaluation.steps=4", "evaluation.random_repeats=2", "evaluation.n_boot=200", "progress=false", "gallery_size=2"]


@pytest.fixture
def eval_cfg(tmp_path, data_dir):
    def make(*overrides: str):
        return compose_config("evaluate", FAST + list(overrides), tmp_path, data_dir)

    return make


def _single_run(cfg):
    client = MlflowClient(store_uri(cfg))
    exp = client.get_experiment_by_name(cfg.logger.experiment_name)
    (run,) = client.search_runs([exp.experiment_id])
    return client, run


def test_samples_with_efficientnet_lite0(eval_cfg, tmp_path):
    explainers = ["sensitivity_l2", "lrp_epsilon_0.01"]
    cfg = eval_cfg("experiment=samek2015_samples", "num_images=3", "data.batch_size=3",
                   f"evaluation.explainers=[{','.join(explainers)}]", "evaluation.orders=[morf,lerf]")
    result = run_evaluate(cfg)
    client, run = _single_run(cfg)
    assert run.info.run_id == result["run_id"] and run.info.status == "FINISHED"
    m = run.data.metrics
    assert m[mn.IMAGES] == 3
    for name in explainers:
        for key in (mn.AOPC, mn.AOPC_REL, mn.ABPC, mn.COMPLEXITY_PNG, mn.COMPLEXITY_JPEG, mn.COMPLEXITY_ENTROPY):
            assert mn.explainer_metric(key, name) in m, mn.explainer_metric(key, name)
        for key in (mn.AOPC_REL, mn.ABPC):
            lo, hi = mn.explainer_metric(key, name, "lo"), mn.explainer_metric(key, name, "hi")
            assert m[lo] <= m[mn.explainer_metric(key, name)] <= m[hi]
        assert m[mn.explainer_metric(mn.AOPC_REL, name)] == pytest.approx(
            m[mn.explainer_metric(mn.AOPC, name)] - m[mn.random_ordering_metric(mn.AOPC)], abs=1e-6)
    ro = [m[mn.random_ordering_metric(mn.AOPC, b)] for b in ("lo", None, "hi")]
    assert ro == sorted(ro)
    assert not any(mn.parse_explainer_metric(k) and mn.parse_explainer_metric(k).explainer == "random_ordering"
                   for k in m)
    assert 0 <= m[mn.ACCURACY] <= 1
    assert run.data.tags["model"] == "efficientnet_lite0"
    assert run.data.params["data.value_range"] == "[0.0, 255.0]"  # the model's own preprocessing
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="evaluation",
                                                     tracking_uri=store_uri(cfg), dst_path=str(tmp_path)))
    summary = pd.read_csv(local / "summary.csv").set_index("explainer")
    assert summary.loc["lrp_epsilon_0.01", mn.AOPC_REL] == pytest.approx(m[mn.explainer_metric(mn.AOPC_REL, "lrp_epsilon_0.01")])
    curves = pd.read_csv(local / "aopc_curves.csv")
    assert len(curves) == len(explainers) * 2 * 5  # explainer × order × (L+1)
    assert "| explainer |" in (local / "summary.md").read_text()
    assert (local / "heatmap_gallery.png").stat().st_size > 0
    # the per-image table holds what the means were taken of; the run logs the ranking's reliability
    per_image = pd.read_parquet(local / "per_image.parquet")
    assert len(per_image) == 3 * len(explainers) * 2 and set(per_image.order) == {"morf", "lerf"}
    for (name, order), part in per_image.groupby(["explainer", "order"]):
        key = "aopc" if order == "morf" else "aopc_lerf"
        assert part.aopc.mean() == pytest.approx(m[f"{key}/{name}"], abs=1e-6)
        assert (part.aopc_rel == part.aopc - part.aopc_random).all()
    for order in ("morf", "lerf", "abpc"):
        assert -1 <= m[mn.reliability_metric("krippendorff_alpha", order)] <= 1
    assert "Krippendorff" in (local / "reliability.md").read_text()


def test_torchvision_model_from_saved_state_dict(eval_cfg, tmp_path):
    torch.manual_seed(0)
    net = zoo.alexnet(weights=None)
    weights = tmp_path / "alexnet.pth"
    torch.save(net.state_dict(), weights)
    # 3 images in batches of 2: results of several batches are joined (the gallery comes from the first)
    cfg = eval_cfg("model=alexnet", f"model.net.weights_path={weights}", "num_images=3", "data.batch_size=2",
                   "evaluation.explainers=[sensitivity_l2,lrp_epsilon_100]", "logger.experiment_name=t-alexnet")
    result = run_evaluate(cfg)
    _, run = _single_run(cfg)
    assert run.info.status == "FINISHED" and run.data.metrics[mn.IMAGES] == 3
    name = mn.explainer_metric(mn.AOPC, "lrp_epsilon_100")
    assert run.data.metrics[name] == pytest.approx(result[name])
    assert run.data.params["model.net.weights_path"] == f"…/{weights.parent.name}/{weights.name}"  # no absolute path


def _no_runs(tmp_path: Path) -> None:
    db = tmp_path / "mlruns" / "mlflow.db"
    if db.exists():
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []


def test_bad_input_on_the_command_line_fails_clearly_and_creates_no_run(tmp_path):
    # the real command line: Hydra parses and composes (an explainer of no config here), the process exits
    args = [sys.executable, "-m", "heatmapbench.app.evaluate", f"paths.mlruns_dir={tmp_path}/mlruns",
            f"hydra.run.dir={tmp_path}/out", *FAST, "explainer=nope"]
    proc = subprocess.run(args, capture_output=True, text=True, env=cli_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: explainer=nope is not a choice of explainer: choose from attnlrp, "), line
    assert ", sensitivity_l2, " in line and "_schema" not in line and " _" not in line, line
    _no_runs(tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["model=vgg16", "model.net.weights_path=/no/such/vgg16.pth"], "/no/such/vgg16.pth"),
    (["model=alexnet", "data=imagefolder", "data.path=/no/such/folder"], "data.path"),
    (["evaluation.explainers=[sensitivity_l2,nope]"], "unknown explainer(s) ['nope']"),
    (["num_images=0"], "num_images=0 is invalid"),
])
def test_bad_input_fails_clearly_and_creates_no_run(eval_cfg, tmp_path, overrides, message):
    code, err = run_main("evaluate", eval_cfg(*overrides))  # the command's main, as the CLI runs it
    assert code == 2 and "error: " in err and message in err, (code, err[-2000:])
    _no_runs(tmp_path)


def test_batches_join_into_the_whole_evaluation():
    """Evaluating in two batches gives the per-image results of evaluating each batch alone."""
    from heatmapbench.evaluation import EvaluationSettings
    from heatmapbench.evaluation import build_explainers, build_perturbation, evaluate_batch
    from heatmapbench.evaluation.core import Evaluation
    from heatmapbench.models import SmallCNN

    torch.manual_seed(0)
    net = SmallCNN().eval()
    x = torch.randn(5, 1, 28, 28)
    settings = EvaluationSettings(explainers=["sensitivity_l2", "lrp_epsilon_0.01"], region_size=7, steps=4,
                                  random_repeats=2, orders=["morf", "lerf"])
    explainers = build_explainers(settings.explainers)
    pert = build_perturbation("constant")
    parts = [evaluate_batch(net, x[:3], explainers, settings, pert, gallery_size=2),
             evaluate_batch(net, x[3:], explainers, settings, pert, gallery_size=0, seed_offset=3)]
    joined = Evaluation.concat(parts, gallery_size=2)
    assert joined.num_images == 5 and joined.gallery_x.shape[0] == 2
    for name in settings.explainers:
        assert joined.gallery_heatmaps[name].shape == (2, 28, 28)
        for order in settings.orders:
            assert torch.equal(joined.curves[name][order][3:], parts[1].curves[name][order])
        assert torch.equal(joined.complexity[name]["png"][:3], parts[0].complexity[name]["png"])
    # a deterministic perturbation gives the same curves whatever the batching
    whole = evaluate_batch(net, x, explainers, settings, pert)
    for name in settings.explainers:
        torch.testing.assert_close(joined.curves[name]["morf"], whole.curves[name]["morf"], rtol=1e-5, atol=1e-5)
