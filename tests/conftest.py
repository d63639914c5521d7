"""Shared fixtures: compose the real configs, shrunk, with a temporary MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import heatmapbench.app.schema  # noqa: F401  (registers the schemas)
from tests.helpers import SHRUNK_TRAIN, compose_config

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One data folder for the whole session (Fashion-MNIST is unpacked into it once)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def train_cfg(tmp_path, data_dir):
    """The real ``train`` config, shrunk: CPU, few batches, temporary store."""

    def make(*overrides: str) -> DictConfig:
        return compose_config("train", SHRUNK_TRAIN + list(overrides), tmp_path, data_dir)

    yield make
    GlobalHydra.instance().clear()


