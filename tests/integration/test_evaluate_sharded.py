"""heatmapbench-evaluate written batch by batch, over processes, killed and resumed: every image once,
and the logged metrics those of the batches joined in memory by one process, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from mlflow import MlflowClient
from PIL import Image

from heatmapbench.metrics import names as mn
from heatmapbench.evaluation import Evaluation, evaluate_batch
from heatmapbench.evaluation.shards import shard_files
from tests.helpers import cli_env, compose_config, store_uri

#: 10 random 16×16 RGB images of 2 classes, an untrained small CNN, two explainers, batches of 4.
EVAL = ["data=imagefolder", "data.image_size=16", "data.resize=16", "data.batch_size=4", "model=small_cnn",
        "model.num_classes=2", "model.net.in_channels=3", "+model.net.image_size=16", "evaluation=small_images",
        "evaluation.region_size=4", "evaluation.steps=4", "evaluation.random_repeats=2",
        "evaluation.explainers=[sensitivity_l2,gradient_x_input]", "evaluation.orders=[morf,lerf]",
        "device=cpu", "progress=false", "evaluation.n_boot=50", "gallery_size=3"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _reference(cfg) -> tuple[Evaluation, dict[str, float]]:
    """What one process scoring the batches in memory and joining them logs (the path before shards)."""
    from heatmapbench.app.evaluate import build_inputs, evaluation_metrics
    from heatmapbench.evaluation.reliability import per_image_table, run_reliability, run_reliability_metrics

    settings, device, net, datamodule, subset, explainers, perturbation = build_inputs(cfg)
    parts = []
    for start in range(0, len(subset), datamodule.batch_size):
        batch = [subset[i] for i in range(start, min(start + datamodule.batch_size, len(subset)))]
        x = torch.stack([b[0] for b in batch])
        y = torch.tensor([b[1] for b in batch])
        parts.append(evaluate_batch(net, x, explainers, settings, perturbation, label=y,
                                    gallery_size=cfg.gallery_size if start == 0 else 0, seed_offset=start,
                                    **datamodule.normalization))
    evaluation = Evaluation.concat(parts, gallery_size=cfg.gallery_size)
    statistics = evaluation.statistics(n_boot=settings.n_boot, seed=settings.seed)
    metrics = evaluation_metrics(evaluation, statistics.summary)
    metrics.update(run_reliability_metrics(run_reliability(per_image_table(evaluation), n_boot=settings.n_boot,
                                                       seed=settings.seed)))
    return evaluation, metrics


def logged_metrics(cfg, run_id: str) -> dict[str, float]:
    return MlflowClient(store_uri(cfg)).get_run(run_id).data.metrics


def test_written_evaluation_logs_the_in_memory_metrics_bit_for_bit(tmp_path, data_dir, images):
    from heatmapbench.app.evaluate import run_evaluate

    cfg = compose_config("evaluate", EVAL + [f"data.path={images}"], tmp_path, data_dir)
    result = run_evaluate(cfg)
    folder = Path(cfg.paths.output_dir) / "batches"
    assert len(shard_files(folder)) == 3  # 10 images in batches of 4
    logged = logged_metrics(cfg, result["run_id"])
    reference = _reference(cfg)[1]
    reference.pop(mn.SECONDS), logged.pop(mn.SECONDS)  # wall time
    assert logged.pop(mn.IMAGES_REUSED) == 0
    assert logged.keys() >= reference.keys()
    assert {k: logged[k] for k in reference} == reference


def _cli(tmp: Path, images: Path, *overrides: str, threads: int | None = None) -> subprocess.CompletedProcess:
    """The command on the images; ``threads``: OMP_NUM_THREADS of its processes (Lightning's DDP on CPU gives
    each rank cores // ranks threads unless it is set)."""
    tmp.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "heatmapbench.app.evaluate", *EVAL, f"data.path={images}",
            f"paths.mlruns_dir={tmp}/mlruns", f"hydra.run.dir={tmp}/out", *overrides]
    env = cli_env(**({} if threads is None else {"OMP_NUM_THREADS": str(threads)}))
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp)


def _only_run(mlruns: Path):
    client = MlflowClient(f"sqlite:///{mlruns}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run


@pytest.mark.slow
def test_two_processes_score_every_image_once_with_one_process_numbers(tmp_path, data_dir, images):
    """DDP over gloo, 2 CPU processes: each rank scores its grid batches; rank 0 merges and logs the
    numbers of one process, per image and in every metric."""
    from heatmapbench.app.evaluate import run_evaluate

    proc = _cli(tmp_path / "two", images, "trainer.devices=2", "trainer.strategy=ddp", threads=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = shard_files(tmp_path / "two" / "out" / "batches")
    assert [p.name for p in shards] == ["batch-000000000-r0.npz", "batch-000000004-r1.npz", "batch-000000008-r0.npz"]
    two = _only_run(tmp_path / "two" / "mlruns")
    assert two.info.status == "FINISHED"

    cfg = compose_config("evaluate", EVAL + [f"data.path={images}"], tmp_path / "one", data_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): a CPU's sums depend on how many threads split them
    try:
        one = logged_metrics(cfg, run_evaluate(cfg)["run_id"])
    finally:
        torch.set_num_threads(threads)
    per_image = [pd.read_parquet(root / "out" / "evaluation" / "per_image.parquet") for root in
                 (tmp_path / "one", tmp_path / "two")]
    pd.testing.assert_frame_equal(per_image[0], per_image[1], check_exact=True)
    assert sorted(per_image[1].image.unique()) == list(range(10))  # none lost, none doubled (the merge checks it)
    logged = dict(two.data.metrics)
    one.pop(mn.SECONDS), logged.pop(mn.SECONDS)
    assert logged == one


class KillAfter(pl.Callback):
    """Sends its own process ``signum`` (default SIGKILL) after ``batches`` scored batches (their shards
    are written first)."""

    def __init__(self, batches: int, signum: int = int(signal.SIGKILL)) -> None:
        self.batches, self.signum, self.seen = batches, signum, 0

    def on_predict_batch_end(self, *args, **kwargs) -> None:
        self.seen += 1
        if self.seen >= self.batches:
            os.kill(os.getpid(), self.signum)


@pytest.mark.slow
def test_killed_evaluation_resumes_to_the_uninterrupted_numbers(tmp_path, data_dir, images):
    """kill -9 after one of three batches; resume=<run folder> reopens the same MLflow run, scores the two
    missing batches only and logs what an uninterrupted run logs; a changed setting is refused first."""
    from heatmapbench.app.evaluate import run_evaluate
    from heatmapbench.app.schema import ConfigError

    killed = tmp_path / "killed"
    proc = _cli(killed, images, f"+callbacks.kill._target_={__name__}.KillAfter", "+callbacks.kill.batches=1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    folder = killed / "out" / "batches"
    assert [p.name for p in shard_files(folder)] == ["batch-000000000-r0.npz"] and not list(folder.glob("*.tmp"))
    run = _only_run(killed / "mlruns")
    assert run.info.status == "RUNNING"  # what a SIGKILL leaves; resume finishes it

    store = f"logger.tracking_uri=sqlite:///{killed}/mlruns/mlflow.db"
    resume = EVAL + [f"data.path={images}", f"resume={killed / 'out'}", store]
    by_id = EVAL + [f"data.path={images}", f"resume={run.info.run_id}", store, "evaluation.steps=3"]
    changed = compose_config("evaluate", by_id, tmp_path / "changed", data_dir)
    with pytest.raises(ConfigError, match=r"^resume=.*: evaluation.steps=3 differs from the run's evaluation.steps=4; "):
        run_evaluate(changed)
    assert len(shard_files(folder)) == 1

    cfg = compose_config("evaluate", resume, tmp_path / "resumed", data_dir)
    result = run_evaluate(cfg)
    assert result["run_id"] == run.info.run_id
    assert [p.name for p in shard_files(folder)] == [f"batch-00000000{i}-r0.npz" for i in (0, 4, 8)]
    finished = MlflowClient(f"sqlite:///{killed}/mlruns/mlflow.db").get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    logged = dict(finished.data.metrics)
    assert logged.pop(mn.IMAGES_REUSED) == 4 and logged[mn.IMAGES] == 10

    evaluation, reference = _reference(compose_config("evaluate", EVAL + [f"data.path={images}"], tmp_path / "ref",
                                                      data_dir))
    reference.pop(mn.SECONDS), logged.pop(mn.SECONDS)
    assert logged == reference
    from heatmapbench.evaluation.reliability import per_image_table

    per_image = pd.read_parquet(killed / "out" / "evaluation" / "per_image.parquet")
    pd.testing.assert_frame_equal(per_image, per_image_table(evaluation), check_exact=True)

    # heatmapbench-report reads the resumed run like any other: its metrics and its per-image table
    from heatmapbench.app.report.store import load_runs, per_image_tables

    runs = load_runs(f"sqlite:///{killed}/mlruns/mlflow.db", [cfg.logger.experiment_name])
    assert runs.run_id.tolist() == [run.info.run_id]
    tables, missing = per_image_tables(runs)
    assert missing == []
    pd.testing.assert_frame_equal(tables.drop(columns="run_id"), per_image, check_exact=True)


@pytest.mark.slow
def test_sigterm_mid_evaluation_leaves_complete_batches_and_a_killed_run(tmp_path, images):
    from heatmapbench.evaluation.shards import images_done, plan_batches

    proc = _cli(tmp_path, images, f"+callbacks.kill._target_={__name__}.KillAfter", "+callbacks.kill.batches=2",
                f"+callbacks.kill.signum={int(signal.SIGTERM)}")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    run = _only_run(tmp_path / "mlruns")
    assert run.info.status == "KILLED" and run.data.tags["end_reason"] == "SIGTERM received"
    folder = tmp_path / "out" / "batches"
    assert images_done(folder).tolist() == list(range(8)) and not list(folder.glob("*.tmp"))
    assert plan_batches(10, 4, images_done(folder)) == [[8, 9]]  # what resume= would score
