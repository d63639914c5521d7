"""Faults late in a run, where they cost most: a store that dies while finished results are logged,
inputs that pass a header check but not a decode, a full disk, runs left RUNNING by a killed process.
Each case is tried for real where this machine allows (real stores, files, subprocesses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_faults import EVAL, eval_cfg, images, runs  # noqa: F401  (fixtures)


# -- results first, then logging ---------------------------------------------------------------
def test_results_are_kept_when_logging_them_fails(eval_cfg, monkeypatch):
    from pytorch_lightning.loggers import MLFlowLogger

    from heatmapbench.app.evaluate import run_evaluate
    from heatmapbench.app.tracking import LoggingFailedError

    def server_gone(self, *args, **kwargs):
        raise ConnectionError("API request to http://store:5000/api/2.0/mlflow/runs/log-batch failed: "
                              "Max retries exceeded (Connection refused)")

    monkeypatch.setattr(MLFlowLogger, "log_metrics", server_gone)
    cfg = eval_cfg()
    folder = Path(cfg.paths.output_dir) / "evaluation"
    with pytest.raises(LoggingFailedError, match=f"logging to MLflow failed .*Connection refused.*; the results are "
                                                 f"saved in {folder}$") as err:
        run_evaluate(cfg)
    assert "\n" not in str(err.value)
    for name in ("summary.csv", "summary.md", "aopc_curves.csv", "reliability.md", "metrics.json"):
        assert (folder / name).stat().st_size > 0, name
    assert list(folder.glob("per_image.*")), sorted(p.name for p in folder.iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["eval/images"] == 12.0
    (run,) = runs(Path(cfg.paths.mlruns_dir).parent)
    assert run.info.status == "FAILED" and "Connection refused" in run.data.tags["end_reason"]


def test_http_retries_are_bounded_to_about_a_minute(monkeypatch):
    from mlflow.environment_variables import (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES,
                                              MLFLOW_HTTP_REQUEST_TIMEOUT)

    from heatmapbench.app.tracking import HTTP_RETRIES, bound_http_retries, worst_case_http_seconds

    for key in HTTP_RETRIES:
        monkeypatch.delenv(key, raising=False)
    assert worst_case_http_seconds() > 600  # MLflow's defaults: minutes per call against a dead server
    bound_http_retries()
    # MLflow reads these per request: its own accessors see the bounded values
    assert (MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get(),
            MLFLOW_HTTP_REQUEST_TIMEOUT.get()) == (3, 1, 10)
    assert worst_case_http_seconds() <= 60
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # what a user exported wins
    bound_http_retries()
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 30


# -- inputs checked for what they are -----------------------------------------------------------
@pytest.fixture
def odd_images(tmp_path) -> Path:
    from tests.integration.test_faults import make_images

    return make_images(tmp_path / "odd")


def _truncated_jpeg(path: Path) -> None:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[:-200])  # the header is whole, the scan data are not


def test_a_truncated_jpeg_is_named_at_the_scan_or_skipped(eval_cfg, odd_images):
    from heatmapbench.data import DataNotFoundError
    from heatmapbench.app.evaluate import run_evaluate
    from tests.integration.test_faults import no_runs

    _truncated_jpeg(odd_images / "class2" / "cut.jpg")
    cfg = eval_cfg(f"data.path={odd_images}")
    with pytest.raises(DataNotFoundError, match=r"cannot read the image .*class2/cut.jpg; .*cut.jpg: .*truncated"):
        run_evaluate(cfg)
    assert no_runs(cfg)
    result = run_evaluate(eval_cfg(f"data.path={odd_images}", "data.skip_unreadable=true"))
    assert result["eval/images"] == 12.0


def test_16_bit_images_are_scaled_not_clipped_and_float_images_refused(odd_images):
    import numpy as np
    from PIL import Image

    from heatmapbench.data import DataNotFoundError, ImageFolderDataModule

    Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16)).save(odd_images / "class0" / "wide.png")
    dm = ImageFolderDataModule(str(odd_images), image_size=32, resize=32, mean=(0, 0, 0), std=(1, 1, 1))
    dm.setup("test")
    index = [Path(f).name for f, _ in dm.test_set.samples].index("wide.png")
    x = dm.test_set[index][0]  # (3, 32, 32) pixels in [0, 1]
    assert x.shape == (3, 32, 32) and torch_allclose(x, round(30000 * 255 / 65535) / 255)  # PIL's convert: 1.0
    Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)).save(odd_images / "class1" / "float.tiff")
    dm = ImageFolderDataModule(str(odd_images), image_size=32, resize=32)
    with pytest.raises(DataNotFoundError, match=r"cannot read the image .*class1/float.tiff;.*mode 'F'") as err:
        dm.setup("test")
    assert "\n" not in str(err.value)


def torch_allclose(x, value: float) -> bool:
    return bool((x - value).abs().max() < 1e-6)


def test_empty_class_folders_are_listed_in_evaluation_and_refused_in_training(odd_images, capsys):
    from heatmapbench.data import DataNotFoundError, ImageFolderDataModule

    (odd_images / "class3").mkdir()
    dm = ImageFolderDataModule(str(odd_images), image_size=32, resize=32)
    dm.setup("test")
    assert dm.num_classes == 4 and "1 class folders under" in capsys.readouterr().out
    dm = ImageFolderDataModule(str(odd_images), train_path=str(odd_images), image_size=32, resize=32)
    with pytest.raises(DataNotFoundError, match=r"training tree .* has class folders with no images \(class3\)"):
        dm.setup("fit")


def test_single_class_training_is_one_line(train_cfg, odd_images):
    import shutil

    from heatmapbench.app.schema import ConfigError
    from heatmapbench.app.train import run_train

    for c in ("class1", "class2"):
        shutil.rmtree(odd_images / c)
    cfg = train_cfg("data=imagefolder", f"data.path={odd_images}", f"data.train_path={odd_images}",
                    "data.image_size=32", "data.resize=32", "model.net.in_channels=3")
    with pytest.raises(ConfigError, match=r"the training data has 1 class \(class0\); a classifier needs at least two"):
        run_train(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["evaluation.explainers=[sensitivity_l2,sensitivity_l2]"],
     r"^evaluation.explainers=\[sensitivity_l2,sensitivity_l2\] is invalid: sensitivity_l2 appears more than once"),
    (["evaluation.orders=[morf,morf]"], r"^evaluation.orders=\[morf,morf\] is invalid: morf appears more than once"),
    (["gallery_size=-1"], r"^gallery_size=-1 is invalid: must be an integer >= 0"),
    (["explainer=lrp_epsilon_0.01", "explainer.epsilon=-1"], r"^explainer.epsilon=-1 is invalid: .*epsilon >= 0$"),
])
def test_evaluation_settings_are_checked_with_cli_phrased_errors(eval_cfg, overrides, message):
    from heatmapbench.app.schema import ConfigError
    from heatmapbench.app.evaluate import run_evaluate
    from tests.integration.test_faults import no_runs

    cfg = eval_cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        run_evaluate(cfg)
    assert no_runs(cfg)
