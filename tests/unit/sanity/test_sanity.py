"""The model-randomisation test: schedule, copies, similarities against scipy/skimage, Quantus 0.6 MPRT."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from heatmapbench.explain import get_explainer
from heatmapbench.models import SmallCNN
from heatmapbench.sanity import (model_randomisation, randomisable_layers, randomised_copy, schedule, spearman_abs,
                                 ssim, topk_intersection)
from heatmapbench.sanity.similarity import average_ranks


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, num_classes=4, width=4, hidden=16, image_size=12).eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- schedule and copies -------------------------------------------------------------------------
def test_layers_and_schedules_name_exactly_the_parametrised_modules():
    net = _net()
    assert randomisable_layers(net) == ["0", "3", "7", "10"]  # conv, conv, linear, linear; no ReLU/pool/dropout
    cascade = schedule(net, "cascading")
    assert [s.label for s in cascade] == ["10", "7", "3", "0"]
    assert [s.layers for s in cascade] == [("10",), ("10", "7"), ("10", "7", "3"), ("10", "7", "3", "0")]
    assert [s.layers for s in schedule(net, "independent")] == [("10",), ("7",), ("3",), ("0",)]
    thin = schedule(net, "cascading", max_steps=2)  # the output layer's step and the whole net
    assert [s.layers for s in thin] == [("10",), ("10", "7", "3", "0")]
    with pytest.raises(ValueError, match="mode"):
        schedule(net, "bottom_up")


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_randomised_copy_changes_exactly_the_scheduled_layers(mode):
    net = _net()
    before = _snapshot(net)
    rng_before = torch.get_rng_state()
    for step in schedule(net, mode):
        clone = randomised_copy(net, step.layers, seed=3)
        for name, tensor in clone.state_dict().items():
            layer = name.rsplit(".", 1)[0]
            changed = not torch.equal(tensor, before[name])
            assert changed == (layer in step.layers), (step, name)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random state is untouched
    for name, tensor in net.state_dict().items():  # the user's model is never modified
        assert torch.equal(tensor, before[name])
    # the same seed re-initialises a layer the same way in every step
    a, b = randomised_copy(net, ("10",), seed=3), randomised_copy(net, ("10", "7"), seed=3)
    assert torch.equal(a[10].weight, b[10].weight)


def test_model_randomisation_leaves_the_model_untouched():
    net = _net()
    net.train()  # a mode the test must restore too
    before = _snapshot(net)
    x = torch.randn(3, 1, 12, 12)
    result = model_randomisation(net, x, {"gradient": get_explainer("sensitivity_l2")}, mode="independent")
    assert net.training and all(m.training for m in net.modules())
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, before[name])
    assert all(p.requires_grad for p in net.parameters())
    assert result.similarity["spearman_abs"]["gradient"].shape == (4, 3)


# -- similarities against hand computations / scipy / skimage -------------------------------------
def test_average_ranks_equal_scipy_with_ties():
    v = torch.tensor([[3.0, 1.0, 3.0, 0.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0, 2.0, 9.0]])
    want = np.stack([stats.rankdata(r) for r in v.numpy()])
    assert np.array_equal(average_ranks(v).numpy(), want)


def test_spearman_of_absolute_values_equals_scipy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 9, 9, generator=g), torch.randn(4, 9, 9, generator=g)
    a[0, :3] = 0.0  # ties
    b[1] = -a[1] * 2  # |b| a monotone function of |a|: rho = 1
    want = [stats.spearmanr(np.abs(x.ravel()), np.abs(y.ravel())).statistic for x, y in zip(a.numpy(), b.numpy())]
    got = spearman_abs(a, b)
    assert np.allclose(got.numpy(), want, atol=1e-12)
    assert got[1] == pytest.approx(1.0)
    assert torch.isnan(spearman_abs(torch.ones(1, 9, 9), a[:1]))[0]  # a constant heatmap has no ranking


def test_ssim_equals_skimage_on_max_normalised_absolute_heatmaps():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 14, 11, generator=g), torch.randn(3, 14, 11, generator=g)
    b[2] = a[2] * -3  # same after abs / max: SSIM 1

    def norm(h):
        h = np.abs(h.astype(np.float64))
        return h / h.max()

    want = [skimage_metrics.structural_similarity(norm(x), norm(y), data_range=1.0)
            for x, y in zip(a.numpy(), b.numpy())]
    got = ssim(a, b)
    assert np.allclose(got.numpy(), want, atol=1e-12)
    assert got[2] == pytest.approx(1.0)
    want5 = skimage_metrics.structural_similarity(norm(a[0].numpy()), norm(b[0].numpy()), data_range=1.0, win_size=5)
    assert ssim(a[:1], b[:1], win_size=5)[0].item() == pytest.approx(want5, abs=1e-12)


def test_topk_intersection_by_hand():
    a = torch.tensor([[[9.0, 8.0, 7.0, 1.0], [0.5, 0.4, 0.3, -10.0]]])  # |a| top-3 locations: 7, 0, 1
    b = torch.tensor([[[0.0, 8.0, 0.0, 9.0], [0.0, 0.0, 0.0, 1.0]]])  # |b| top-3: 3, 1, 7
    assert topk_intersection(a, b, fraction=3 / 8).item() == pytest.approx(2 / 3)  # {7, 1} shared
    assert topk_intersection(a, a, fraction=0.5).item() == 1.0


# -- against Quantus 0.6 ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode, order", [("cascading", "top_down"), ("independent", "independent")])
def test_equal_to_quantus_mprt(mode, order):
    quantus = pytest.importorskip("quantus")
    net = _net(1)
    x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    explainer = get_explainer("sensitivity_l2")
    target = net(x).argmax(1)
    ours = model_randomisation(copy.deepcopy(net), x, {"g": explainer}, target=target, mode=mode, seed=7,
                               measures=["spearman_abs"])

    def explain(model, inputs, targets, **kwargs):
        h = explainer(model, torch.as_tensor(inputs), torch.as_tensor(targets))
        return h.unsqueeze(1).numpy()

    metric = quantus.MPRT(layer_order=order, seed=7 - 1, disable_warnings=True)  # Quantus seeds with seed + 1
    scores = metric(model=net, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=None, explain_func=explain,
                    device="cpu", batch_size=5)
    layers = [name for name in scores if name != "original"]  # independent: in model order
    assert layers == [s.label for s in ours.steps][::1 if mode == "cascading" else -1]
    theirs = np.array([scores[s.label] for s in ours.steps])  # (S, N)
    assert np.allclose(ours.similarity["spearman_abs"]["g"].numpy(), theirs, atol=1e-6)
    assert not np.allclose(theirs, 1.0)  # the test compares something that changed


# -- inside heatmapbench-evaluate --------------------------------------------------------------------
@pytest.mark.slow
def test_evaluate_with_sanity_logs_metrics_and_artifacts(tmp_path, data_dir):
    from mlflow import MlflowClient

    from heatmapbench.metrics import names as mn
    from heatmapbench.app.evaluate import run_evaluate
    from tests.helpers import compose_config, store_uri

    explainers = ["sensitivity_l2", "guided_backprop"]
    cfg = compose_config("evaluate", [
        "data=fashion_mnist", "model=small_cnn", "evaluation=small_images", "sanity=mprt", "num_images=6",
        "evaluation.steps=4", "evaluation.random_repeats=1", "evaluation.n_boot=50", "progress=false",
        "gallery_size=0", f"evaluation.explainers=[{','.join(explainers)}]", "sanity.num_images=4",
        "sanity.max_steps=2", "sanity.gallery_size=1", "device=cpu"], tmp_path, data_dir)
    result = run_evaluate(cfg)
    client = MlflowClient(store_uri(cfg))
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for name in explainers:
        lo, mid, hi = (m[mn.sanity_metric("mprt", name, b)] for b in ("lo", None, "hi"))
        assert -1 <= lo <= mid <= hi <= 1
        assert mid == m[mn.sanity_metric("mprt_spearman_abs", name)]
        for measure in ("ssim", "topk"):
            assert mn.sanity_metric(f"mprt_{measure}", name) in m
            assert mn.sanity_metric(f"mprt_independent_{measure}", name) in m
    files = {f.path for f in client.list_artifacts(run.info.run_id, "sanity")}
    assert {"sanity/mprt_summary.csv", "sanity/mprt_per_image.csv", "sanity/mprt_cascading.png",
            "sanity/mprt_cascading_heatmaps.png", "sanity/mprt_independent.png"} <= files
    # metrics.json, in the output folder and as the run's artifact, holds everything logged, sanity metrics included
    written = json.loads((Path(cfg.paths.output_dir) / "evaluation" / "metrics.json").read_text())
    assert any(key.startswith("sanity/") for key in written) and mn.sanity_metric("mprt", explainers[0]) in written
    assert {k: v for k, v in written.items() if v is not None} == {k: v for k, v in m.items() if v == v}  # NaN: null
    logged = Path(client.download_artifacts(run.info.run_id, "evaluation/metrics.json", str(tmp_path)))
    assert json.loads(logged.read_text()) == written


def test_bad_sanity_config_fails_before_any_run(tmp_path, data_dir):
    from heatmapbench.app.schema import ConfigError
    from heatmapbench.app.evaluate import run_evaluate
    from tests.helpers import compose_config

    cfg = compose_config("evaluate", ["data=fashion_mnist", "model=small_cnn", "evaluation=small_images", "sanity=mprt",
                                      "sanity.modes=[bottom_up]", "num_images=2"], tmp_path, data_dir)
    with pytest.raises(ConfigError, match="sanity.modes"):
        run_evaluate(cfg)
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
