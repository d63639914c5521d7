"""Fixtures of the command-level tests: a tiny image folder and the evaluate config around it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import EVAL, compose_config, make_images


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture
def eval_cfg(tmp_path, data_dir, images):
    def make(*overrides: str):
        return compose_config("evaluate", EVAL + [f"data.path={images}", "evaluation.random_repeats=1",
                                                  "evaluation.steps=4", *overrides], tmp_path, data_dir)

    return make
