"""Shared fixtures: compose the real configs, shrunk, with a temporary MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import heatmapbench
import heatmapbench.app.schema  # noqa: F401  (registers the schemas)
from heatmapbench.registry import conf_dir

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: the package under test (not another install of it) and
    the repository (for ``tests``) first on the path."""
    path = os.pathsep.join([str(Path(heatmapbench.__file__).resolve().parents[1]), str(REPO)])
    return {**os.environ, "PYTHONPATH": path, **extra}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder for the whole session (Fashion-MNIST is unpacked into it once)."""
    return tmp_path_factory.mktemp("data")


def compose_config(config_name: str, overrides: list[str], tmp_path: Path, data_dir: Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` like the CLI would, with paths in ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
        cfg.paths.mlruns_dir = str(tmp_path / "mlruns")
        cfg.paths.data_dir = str(data_dir)
    return cfg


@pytest.fixture
def train_cfg(tmp_path, data_dir):
    """The real ``train`` config, shrunk: CPU, few batches, temporary store."""

    def make(*overrides: str) -> DictConfig:
        base = ["trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=8",
                "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
                "trainer.enable_model_summary=false", "trainer.enable_progress_bar=false",
                "callbacks.progress_bar=null", "data.eval_subset_size=16"]
        return compose_config("train", base + list(overrides), tmp_path, data_dir)

    yield make
    GlobalHydra.instance().clear()


def store_uri(cfg: DictConfig) -> str:
    return f"sqlite:///{cfg.paths.mlruns_dir}/mlflow.db"
