"""How heatmapbench-evaluate sets up its prediction loop: the Trainer's arguments and the process's rank."""

from __future__ import annotations

import pytest

from heatmapbench.app.evaluate import launched_rank, trainer_kwargs
from heatmapbench.app.schema import ConfigError
from tests.helpers import compose_config


@pytest.fixture
def cfg(tmp_path, data_dir):
    return lambda *overrides: compose_config("evaluate", list(overrides), tmp_path, data_dir)


def test_trainer_runs_with_gradients_and_without_lightning_logging(cfg):
    kwargs = trainer_kwargs(cfg("device=cpu", "trainer.devices=2", "trainer.strategy=ddp", "trainer.num_nodes=1"))
    assert kwargs["accelerator"] == "cpu" and kwargs["devices"] == 2 and kwargs["strategy"] == "ddp"
    assert kwargs["inference_mode"] is False  # the explainers' backward passes
    assert kwargs["use_distributed_sampler"] is False  # the grid's batches are split by rank, unpadded
    assert kwargs["logger"] is False and kwargs["enable_checkpointing"] is False


@pytest.mark.parametrize("overrides, message", [
    (["trainer.precision=bf16-mixed"], r"trainer.precision=bf16-mixed is invalid for evaluate: .*evaluation.precision"),
    (["device=cpu", "trainer.accelerator=gpu"], r"device=cpu and trainer.accelerator=gpu disagree"),
])
def test_trainer_settings_that_would_change_the_numbers_are_refused(cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        trainer_kwargs(cfg(*overrides))


@pytest.mark.parametrize("env, rank", [({}, 0), ({"LOCAL_RANK": "1"}, 1), ({"SLURM_PROCID": "5"}, 5),
                                       ({"RANK": "0", "LOCAL_RANK": "0"}, 0), ({"NODE_RANK": "1"}, 1)])
def test_launched_rank_reads_the_launchers_variables(monkeypatch, env, rank):
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launched_rank() == rank
