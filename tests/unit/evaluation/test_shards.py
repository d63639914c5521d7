"""Shards: one scored batch per file, merged back into exactly the evaluation of the batches joined in
memory; an image missing or held twice is refused."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

from heatmapbench.evaluation import EvaluationSettings
from heatmapbench.evaluation import Evaluation, build_explainers, build_perturbation, evaluate_batch
from heatmapbench.evaluation.shards import ShardError, merge_shards, plan_batches, save_shard, shard_files


def _parts(x: torch.Tensor, bounds: list[tuple[int, int]], gallery: int) -> list[Evaluation]:
    torch.manual_seed(0)
    from heatmapbench.models import SmallCNN

    net = SmallCNN().eval()
    settings = EvaluationSettings(explainers=["sensitivity_l2", "lrp_epsilon_0.01"], region_size=7, steps=4,
                                  random_repeats=2, orders=["morf", "lerf"])
    explainers, pert = build_explainers(settings.explainers), build_perturbation("uniform")
    return [evaluate_batch(net, x[a:b], explainers, settings, pert, label=torch.arange(a, b) % 10,
                           gallery_size=max(0, min(gallery - a, b - a)), seed_offset=a) for a, b in bounds]


def _assert_same(a: Evaluation, b: Evaluation) -> None:
    assert a.steps == b.steps and a.explainers == b.explainers
    for name in a.explainers:
        assert list(a.curves[name]) == list(b.curves[name])
        for order in a.curves[name]:
            assert torch.equal(a.curves[name][order], b.curves[name][order])
        for kind in a.complexity[name]:
            assert torch.equal(a.complexity[name][kind], b.complexity[name][kind])
        assert torch.equal(a.gallery_heatmaps[name], b.gallery_heatmaps[name])
    for key in ("random_curves", "target", "label", "clean_scores", "gallery_x"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_shards_merge_into_the_concatenated_evaluation(tmp_path):
    x = torch.randn(7, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    bounds = [(0, 3), (3, 6), (6, 7)]
    parts = _parts(x, bounds, gallery=4)
    for (a, b), part in reversed(list(zip(bounds, parts))):  # written in any order, by any rank
        save_shard(tmp_path, torch.arange(a, b), part, rank=a % 2)
    merged = merge_shards(tmp_path, 7, gallery_size=4)
    reference = Evaluation.concat(parts, gallery_size=4)
    _assert_same(merged, reference)
    assert merged.gallery_x.shape[0] == 4  # three from the first batch, one from the second
    pd.testing.assert_frame_equal(merged.statistics(n_boot=100).summary, reference.statistics(n_boot=100).summary)
    assert not list(tmp_path.glob("*.tmp"))

    # an image lost or scored twice is refused, never averaged over
    extra = tmp_path / "doubled"
    shutil.copytree(tmp_path, extra)
    save_shard(extra, torch.arange(3, 6), parts[1], rank=9)
    with pytest.raises(ShardError, match=r"images \[3, 4, 5\] \(of 3\) more than once"):
        merge_shards(extra, 7)
    shard_files(tmp_path)[-1].unlink()  # the batch of image 6
    with pytest.raises(ShardError, match=r"lacks images \[6\] \(of 1\)"):
        merge_shards(tmp_path, 7)


def test_plan_is_a_fixed_grid_less_what_is_done():
    assert plan_batches(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plan_batches(10, 4, done=[4, 5, 6, 7, 0]) == [[1, 2, 3], [8, 9]]
    assert plan_batches(3, 4, done=[0, 1, 2]) == []


def test_one_join_for_batches_in_memory_and_from_shards():
    """Evaluation.concat is the join of both paths: batches given out of order with their image indices
    (as shards come) give, tensor for tensor, the in-order join; the gallery keeps the lowest images."""
    x = torch.randn(7, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    bounds = [(0, 3), (3, 6), (6, 7)]
    parts = _parts(x, bounds, gallery=4)
    in_order = Evaluation.concat(parts, gallery_size=4)
    shuffled = Evaluation.concat([parts[2], parts[0], parts[1]], gallery_size=4,
                                 images=[torch.arange(6, 7), torch.arange(0, 3), torch.arange(3, 6)])
    _assert_same(shuffled, in_order)
    assert torch.equal(in_order.label, torch.arange(7) % 10)  # rows in image order
    assert torch.equal(in_order.gallery_x, torch.cat([parts[0].gallery_x, parts[1].gallery_x])) and len(in_order.gallery_x) == 4
    assert Evaluation.concat(parts, gallery_size=0).gallery_x is None  # no gallery asked: none, not an empty one
    with pytest.raises(ValueError, match="one index per image"):
        Evaluation.concat(parts, images=[torch.arange(3), torch.arange(3, 6)])
    other = _parts(x, [(0, 3)], gallery=0)[0]
    other.curves.pop("sensitivity_l2")
    with pytest.raises(ValueError, match="different settings"):
        Evaluation.concat([parts[0], other])


@pytest.mark.parametrize("given", [[], {}])
def test_no_explainers_names_the_argument_and_the_command_the_key(given):
    """The library names its argument; a command that passed ``evaluation.explainers`` reads that key."""
    from heatmapbench.app.schema import config_error

    with pytest.raises(ValueError) as err:
        build_explainers(given)
    assert str(err.value) == f"explainers={given!r} is invalid: name at least one explainer (a registered name or an Explainer)"
    assert str(config_error("evaluation", err.value)).startswith(f"evaluation.explainers={given!r} is invalid: name at")
