"""resume=: which settings a resumed evaluation may change, and the one-line refusals before any work."""

from __future__ import annotations

import json

import pytest

from heatmapbench.app.resume import MANIFEST, find_resume, result_settings
from heatmapbench.app.schema import ConfigError
from tests.helpers import compose_config


@pytest.fixture
def cfg(tmp_path, data_dir):
    return lambda *overrides: compose_config("evaluate", ["model=small_cnn", "data=fashion_mnist", *overrides],
                                             tmp_path, data_dir)


def test_only_how_and_where_it_runs_may_change(cfg):
    base = result_settings(cfg())
    same = result_settings(cfg("data.batch_size=7", "device=cpu", "trainer.devices=4", "trainer.strategy=ddp",
                               "progress=false", "evaluation.batch_size=3", "resume=/somewhere"))
    assert same == base
    for override, key in (("evaluation.steps=3", "evaluation.steps"), ("num_images=5", "num_images"),
                          ("seed=1", "seed"), ("perturbation=blur", "perturbation._target_")):
        changed = result_settings(cfg(override))
        assert changed[key] != base.get(key), override


def test_refusals_name_what_to_pass(cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"resume='nope' is neither a folder nor a run id of sqlite:///"):
        find_resume(cfg("resume=nope"))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ConfigError, match=rf"resume={empty}: {empty}/batches/{MANIFEST} does not exist"):
        find_resume(cfg(f"resume={empty}"))
    (empty / "batches").mkdir()
    (empty / "batches" / MANIFEST).write_text(json.dumps({"run_id": "r", "tracking_uri": "sqlite:////elsewhere.db",
                                                          "settings": {}}))
    with pytest.raises(ConfigError, match=r"the run is in the store sqlite:////elsewhere.db, not in .*; pass "
                                          r"logger.tracking_uri=sqlite:////elsewhere.db$"):
        find_resume(cfg(f"resume={empty}"))
