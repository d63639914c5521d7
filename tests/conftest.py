"""Shared fixtures: compose the real configs, shrunk, with a temporary MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import heatmapbench.app.schema  # noqa: F401  (registers the schemas)
from tests.helpers import compose_config

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder for the whole session (Fashion-MNIST is unpacked into it once)."""
    return tmp_path_factory.mktemp("data")


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


