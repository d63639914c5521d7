"""Which runs the report's metric agreement compares: the same network, data and weights only."""

from heatmapbench.app.report.agreement import _group

CKPT = "outputs/demo/runs/2026-12-07_04-06-26-422e/checkpoints/last.ckpt"


def _evaluate(weights: str = CKPT) -> dict:
    """An evaluate run of a heatmapbench-train checkpoint, as MLflow returns it (short class names)."""
    return {"tags.task": "evaluate", "tags.model": "from_checkpoint", "tags.data": "FashionMNISTDataModule",
            "tags.weights": weights, "params.model.net": "from_checkpoint", "params.model.net.net": "SmallCNN"}


def _roar(ckpt: str | None = CKPT) -> dict:
    run = {"tags.task": "roar", "tags.model": "SmallCNN", "tags.data": "FashionMNISTDataModule",
           "tags.roar_id": "d42ebf2d38d1", "tags.roar_role": "parent", "params.model.net": "SmallCNN"}
    return run if ckpt is None else {**run, "params.ckpt_path": ckpt}


def test_a_roar_run_on_the_checkpoint_an_evaluate_run_scored_joins_its_group():
    assert _group(_roar()) == _group(_evaluate()) == f"SmallCNN / FashionMNISTDataModule / {CKPT}"
    assert _group(_roar("./" + CKPT)) == _group(_evaluate())


def test_other_weights_of_the_same_network_are_not_compared():
    assert _group(_evaluate("outputs/demo/runs/other/checkpoints/last.ckpt")) != _group(_evaluate())
    # without ckpt_path ROAR explains a network it trained itself: no evaluate run measured that one
    assert _group(_roar(None)) not in {_group(_evaluate()), _group(_roar())}


def test_runs_that_logged_the_full_target_path_still_name_the_network():
    old = {**_evaluate(), "params.model.net.net._target_": "heatmapbench.models.SmallCNN"}
    del old["params.model.net.net"]
    assert _group(old) == _group(_evaluate())
