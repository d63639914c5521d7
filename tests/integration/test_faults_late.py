"""Faults late in a run, where they cost most: a store that dies while finished results are logged,
inputs that pass a header check but not a decode, a full disk, runs left RUNNING by a killed process.
Each case is tried for real where this machine allows (real stores, files, subprocesses)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import EVAL, TRAIN, needs_fmnist, runs


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
    assert "heartbeat" in run.data.tags  # an open run says it is alive (heatmapbench-runs reads it)


def test_http_retries_are_bounded_to_about_a_minute(monkeypatch):
    from mlflow.environment_variables import (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES,
                                              MLFLOW_HTTP_REQUEST_TIMEOUT)

    from heatmapbench.app.store import HTTP_RETRIES, bound_http_retries, worst_case_http_seconds

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
    from tests.helpers import make_images

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
    from tests.helpers import no_runs

    _truncated_jpeg(odd_images / "class2" / "cut.jpg")
    cfg = eval_cfg(f"data.path={odd_images}")
    with pytest.raises(DataNotFoundError, match=r"cannot read the image .*class2/cut.jpg; .*cut.jpg: .*truncated"):
        run_evaluate(cfg)
    assert no_runs(cfg)
    result = run_evaluate(eval_cfg(f"data.path={odd_images}", "data.skip_unreadable=true"))
    assert result["eval/images"] == 12.0


def _torn_jpeg(path: Path) -> None:
    """A progressive JPEG whose header and end are whole but whose second scan's header is damaged."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        buf, "JPEG", progressive=True)
    data = bytearray(buf.getvalue())
    second_scan = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)  # SOS marker, length (2 bytes), count
    data[second_scan + 4] = 9  # components in the scan: 9, of an image with 3
    path.write_bytes(bytes(data))


def test_a_jpeg_corrupt_in_the_middle_is_named_at_the_scan_or_skipped(eval_cfg, odd_images):
    from PIL import Image

    from heatmapbench.app.evaluate import run_evaluate
    from heatmapbench.data import DataNotFoundError
    from heatmapbench.data.imagefolder import UnreadableImageError, read_rgb
    from tests.helpers import no_runs

    torn = odd_images / "class1" / "torn.jpg"
    _torn_jpeg(torn)
    assert torn.read_bytes().endswith(b"\xff\xd9")  # its end is whole: a look at the end cannot tell
    with Image.open(torn) as image:
        assert image.size == (32, 32)  # nor can its header
    with pytest.raises(UnreadableImageError, match="torn.jpg"):
        read_rgb(str(torn))  # what the data loader would meet mid-run
    cfg = eval_cfg(f"data.path={odd_images}")
    with pytest.raises(DataNotFoundError, match=r"cannot read the image .*class1/torn.jpg; .*torn.jpg: ") as err:
        run_evaluate(cfg)
    assert "\n" not in str(err.value) and no_runs(cfg)
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
    (["explainer=cp_lrp", "explainer.gamma=-1"], r"^explainer.gamma=-1 is invalid: the gamma rule needs gamma >= 0"),
])
def test_evaluation_settings_are_checked_with_cli_phrased_errors(eval_cfg, overrides, message):
    from heatmapbench.app.schema import ConfigError
    from heatmapbench.app.evaluate import run_evaluate
    from tests.helpers import no_runs

    cfg = eval_cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        run_evaluate(cfg)
    assert no_runs(cfg)


# -- the model named where the model is at fault ------------------------------------------------
class _Padded(__import__("torch").nn.Module):
    """conv(pad(x)) with the pad as a function or as nn.ZeroPad2d (the same numbers)."""

    def __init__(self, functional: bool) -> None:
        from torch import nn

        super().__init__()
        self.functional = functional
        self.pad = nn.ZeroPad2d(1)
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        import torch.nn.functional as F

        x = F.pad(x, (1, 1, 1, 1)) if self.functional else self.pad(x)
        return self.fc(F.relu(self.conv(x)).flatten(1))


def test_functional_pad_is_routed_like_the_module_under_lrp():
    import torch

    from heatmapbench.explain import LRP
    from tests.helpers import gradient_x_input

    torch.manual_seed(0)
    module = _Padded(functional=False).double().eval()
    functional = _Padded(functional=True).double().eval()
    functional.load_state_dict(module.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 2])
    lrp = LRP(composite="epsilon", epsilon=1e-12, stabilizer=1e-12)
    with torch.no_grad():
        assert torch.equal(module(x), functional(x))
    relevance = lrp.attribute(functional, x.clone(), target).sum(1).detach()  # (B, H, W)
    assert torch.allclose(relevance, lrp.attribute(module, x.clone(), target).sum(1), rtol=0, atol=1e-12)
    reference = gradient_x_input(functional, x, target)  # LRP-0 = gradient x input on a ReLU net
    assert float((relevance - reference).norm() / reference.norm()) <= 1e-8


def test_nan_scores_of_the_model_are_named_as_the_models():
    import torch

    from heatmapbench.app.schema import EvaluationSettings
    from heatmapbench.evaluation import ModelScoresNotFinite, evaluate_batch

    model = _Padded(functional=False).eval()
    with torch.no_grad():
        model.fc.bias[1] = float("nan")
    settings = EvaluationSettings(explainers=["sensitivity_l2"], region_size=2, steps=3, random_repeats=1)
    with pytest.raises(ModelScoresNotFinite, match=r"the model's scores are not finite \(NaN or inf\) for 2 of 2 "
                                                   r"images .*the model is at fault, not an explainer"):
        evaluate_batch(model, torch.rand(2, 3, 8, 8), settings=settings)


class Diverge(__import__("pytorch_lightning").Callback):
    """Sets every weight to NaN when the first training epoch starts: a diverged training, for certain."""

    def on_train_epoch_start(self, trainer, pl_module):
        import torch

        with torch.no_grad():
            for p in pl_module.parameters():
                p.fill_(float("nan"))


@needs_fmnist
def test_a_diverged_training_keeps_training_and_records_aopc_as_not_measured(train_cfg):
    from mlflow import MlflowClient

    from heatmapbench.metrics import names as mn
    from heatmapbench.callbacks.aopc import NOT_FINITE
    from heatmapbench.app.train import run_train

    cfg = train_cfg(*TRAIN, "test=false", "+callbacks.diverge._target_=tests.integration.test_faults_late.Diverge")
    result = run_train(cfg)
    (run,) = runs(Path(cfg.paths.mlruns_dir).parent)
    assert run.info.status == "FINISHED" and run.info.run_id == result["run_id"]

    client = MlflowClient(f"sqlite:///{cfg.paths.mlruns_dir}/mlflow.db")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, mn.explainer_metric(mn.AOPC_REL, "sensitivity_l2"))]
    assert len(steps) == 1  # epoch 0 (before training) measured, epoch 1 not
    epochs = sorted(m.value for m in client.get_metric_history(run.info.run_id, mn.EPOCH))
    assert epochs == [0.0, 1.0]
    text = Path(client.download_artifacts(run.info.run_id, "aopc/epoch_001/not_measured.txt",
                                          str(Path(cfg.paths.output_dir) / "dl"))).read_text()
    assert text.startswith(NOT_FINITE)


# -- one-line errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false"])
def test_trainer_flags_turn_their_callbacks_off(train_cfg, flag):
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from heatmapbench.app.plumbing import instantiate_callbacks
    from heatmapbench.app.train import callbacks_the_trainer_allows

    base = [o for o in TRAIN if not o.startswith(("callbacks.progress_bar", "trainer.enable_progress_bar"))]
    cfg = train_cfg(*base, flag)
    callbacks = callbacks_the_trainer_allows(instantiate_callbacks(cfg.callbacks), cfg.trainer)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False)  # Lightning refused the pair before
    assert isinstance(trainer, pl.Trainer)
    kind = pl.callbacks.ProgressBar if "progress" in flag else pl.callbacks.ModelCheckpoint
    assert not any(isinstance(c, kind) for c in trainer.callbacks)


def test_a_server_that_is_not_mlflow_is_one_line():
    import http.server
    import threading

    from heatmapbench.app.schema import ConfigError
    from heatmapbench.app.preflight import check_tracking_store

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ConfigError, match=rf"logger.tracking_uri='{uri}': the server there is not an MLflow "
                                              r"tracking server \(.*HTTP 404\)") as err:
            check_tracking_store(uri, timeout=2.0)
    finally:
        server.shutdown()
    assert "\n" not in str(err.value) and "<html" not in str(err.value).lower()


@pytest.mark.parametrize("case, message", [
    ("no weights", r"vgg16: pretrained IMAGENET1K_V1 weights not found"),
    ("wrong weights", r"^model: vgg16: the weights in .*wrong.pth do not fit the network: 32 keys missing "
                      r"\(features.0.weight, .*\); 1 keys unexpected \(a\)$"),
    ("checkpoint of another model", r"^checkpoint ckpt_path=\S+small.ckpt: its weights do not fit model \(VGG\), "
                                    r"which must be the architecture trained: .*keys missing"),
])
def test_evaluate_builds_models_through_one_line_errors(tmp_path, data_dir, images, monkeypatch, case, message):
    import torch

    from heatmapbench.app.evaluate import build_inputs
    from heatmapbench.models import SmallCNN
    from heatmapbench.models.errors import CheckpointError
    from heatmapbench.models.zoo import WeightsNotFoundError
    from heatmapbench.app.schema import ConfigError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_hub"))  # no cached weights
    torch.save({"a": torch.zeros(2)}, tmp_path / "wrong.pth")
    torch.save({"state_dict": {f"net.{k}": v for k, v in SmallCNN().state_dict().items()}}, tmp_path / "small.ckpt")
    overrides = {"no weights": ["model=vgg16"], "wrong weights": ["model=vgg16", f"model.net.weights_path={tmp_path}/wrong.pth"],
                 "checkpoint of another model": ["model=vgg16", "model.net.weights=null", f"ckpt_path={tmp_path}/small.ckpt"]}
    from tests.helpers import compose_config

    cfg = compose_config("evaluate", [*overrides[case], "data=imagefolder", f"data.path={images}", "device=cpu"],
                         tmp_path, data_dir)
    with pytest.raises((ConfigError, WeightsNotFoundError, CheckpointError), match=message):
        build_inputs(cfg)


def test_output_folders_are_unique_per_run(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from heatmapbench.app.schema import unique_suffix
    from heatmapbench.registry import conf_dir

    def folders() -> tuple[str, str]:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("train", return_hydra_config=True)
        return OmegaConf.select(cfg, "hydra.run.dir"), OmegaConf.select(cfg, "hydra.sweep.dir")

    first, again = folders(), folders()
    drawn = unique_suffix()
    assert all(f.endswith(f"-{drawn}") for f in (*first, *again))  # one process: one suffix
    unique_suffix.cache_clear()  # a second process started in the same second draws its own
    second = folders()
    GlobalHydra.instance().clear()
    assert all(f.endswith(f"-{unique_suffix()}") for f in second)


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_an_unwritable_output_folder_is_one_line(tmp_path, data_dir, capsys, key):
    from hydra.utils import instantiate

    from tests.helpers import compose_config

    (tmp_path / "a_file").write_text("")
    cfg = compose_config("evaluate", [f"{key}={tmp_path}/a_file/out"], tmp_path, data_dir)
    check = instantiate(cfg.hydra.callbacks.output_folder)  # what Hydra runs before it makes the folder
    with pytest.raises(SystemExit) as exit_:
        (check.on_run_start if key == "hydra.run.dir" else check.on_multirun_start)(config=cfg)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}='{tmp_path}/a_file/out' is invalid: cannot write to") and err.count("\n") == 1


# -- every run closed -----------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_to_a_joblib_sweeps_parent_reaches_its_workers(tmp_path, images):
    import signal
    import time

    import psutil

    from tests.helpers import finish, start, wait_for_running

    proc = start(tmp_path, "evaluate", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *EVAL,
                 f"data.path={images}", "evaluation.random_repeats=20000", "evaluation.seed=0,1,2")
    wait_for_running(proc, tmp_path)  # 20000 random orderings: no job can finish before the signal
    workers = psutil.Process(proc.pid).children(recursive=True)
    sent_ms = time.time() * 1000
    proc.send_signal(signal.SIGTERM)  # to the parent alone, as docker stop and Kubernetes do
    code, out = finish(proc, timeout=180)
    assert code == 143, out[-3000:]
    assert "passing it to the sweep's" in out and "jobs not started did not run" in out
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]  # no orphans
    found = runs(tmp_path)
    assert found and {r.info.status for r in found} == {"KILLED"}, [
        (r.info.status, r.info.end_time - sent_ms, r.data.tags.get("end_reason")) for r in found]


class _SignalInAFinalizer:
    """Sends SIGTERM to its own process from its finalizer: the handler's exception is raised inside
    ``__del__``, where CPython only prints it (as it does in a weakref callback, e.g. of a database
    connection MLflow lets go while it logs)."""

    def __del__(self):
        import os
        import signal
        import time

        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)  # the handler runs here, inside the finalizer


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost exception, printed
def test_a_signal_whose_exception_a_finalizer_loses_while_a_run_is_logged_still_ends_it_killed(eval_cfg, monkeypatch):
    from pytorch_lightning.loggers import MLFlowLogger

    from heatmapbench.app.evaluate import run_evaluate
    from heatmapbench.app.tracking import RunInterrupted

    real, fired = MLFlowLogger.log_metrics, []

    def logged_while_a_finalizer_runs(self, *args, **kwargs):
        if not fired:
            fired.append(True)
            _SignalInAFinalizer()  # dropped at once: its finalizer runs here, in the logging phase
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MLFlowLogger, "log_metrics", logged_while_a_finalizer_runs)
    cfg = eval_cfg()
    with pytest.raises(RunInterrupted, match="^SIGTERM received$"):  # went on to FINISHED before
        run_evaluate(cfg)
    assert fired
    (run,) = runs(Path(cfg.paths.mlruns_dir).parent)
    assert run.info.status == "KILLED" and run.data.tags["end_reason"] == "SIGTERM received"


def test_a_signal_while_the_run_is_closed_finished_is_raised_after_the_close(eval_cfg, monkeypatch):
    import os
    import signal
    import time

    from mlflow import MlflowClient
    from mlflow.store.tracking.dbmodels.models import SqlRun

    from heatmapbench.app.evaluate import run_evaluate
    from heatmapbench.app.tracking import RunInterrupted

    real_close, real_entity, armed = MlflowClient.set_terminated, SqlRun.to_mlflow_entity, []

    def set_terminated(self, *args, **kwargs):
        armed.append("closing")
        return real_close(self, *args, **kwargs)

    def to_mlflow_entity(self):  # read inside update_run_info's session, after its UPDATE: a write open
        if armed == ["closing"]:
            armed.append("signalled")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        return real_entity(self)

    monkeypatch.setattr(MlflowClient, "set_terminated", set_terminated)
    monkeypatch.setattr(SqlRun, "to_mlflow_entity", to_mlflow_entity)
    cfg = eval_cfg()
    start = time.monotonic()
    with pytest.raises(RunInterrupted, match="^SIGTERM received$"):
        run_evaluate(cfg)
    assert "signalled" in armed and time.monotonic() - start < 60
    (run,) = runs(Path(cfg.paths.mlruns_dir).parent)
    assert run.info.status == "FINISHED"  # it was complete; the process stops all the same


def test_a_signal_inside_the_store_client_is_raised_once_the_call_is_done(eval_cfg, monkeypatch):
    import os
    import signal
    import time

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from heatmapbench.app.evaluate import run_evaluate
    from heatmapbench.app.tracking import RunInterrupted

    real, fired = SqlAlchemyStore._log_metrics, []

    def log_metrics(self, run_id, metrics):  # called by the store's log_batch: inside its client code
        if not fired and any(m.key == "eval/images" for m in metrics):
            fired.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.3)  # the handler runs here; raised here, the metrics were never written
        return real(self, run_id, metrics)

    monkeypatch.setattr(SqlAlchemyStore, "_log_metrics", log_metrics)
    cfg = eval_cfg()
    with pytest.raises(RunInterrupted, match="^SIGTERM received$"):
        run_evaluate(cfg)
    (run,) = runs(Path(cfg.paths.mlruns_dir).parent)
    assert fired and run.info.status == "KILLED"
    assert "eval/images" in run.data.metrics  # the store call the signal landed in completed


def test_stale_running_runs_are_listed_closed_and_counted_by_the_report(tmp_path, capsys):
    import time

    from mlflow import MlflowClient

    from heatmapbench.app.report.store import load_runs
    from heatmapbench.app.runs import main as runs_main
    from heatmapbench.app.tracking import HEARTBEAT_TAG, heartbeat

    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(uri)
    exp = client.create_experiment("heatmapbench-evaluate", artifact_location=str(tmp_path / "artifacts"))
    done = client.create_run(exp, run_name="done")
    client.log_metric(done.info.run_id, "aopc_rel/x", 0.1)
    client.set_terminated(done.info.run_id, "FINISHED")
    # what SIGKILL or the OOM killer leaves: a RUNNING run whose last heartbeat is 15 minutes old
    dead = client.create_run(exp, run_name="killed")
    client.set_tag(dead.info.run_id, HEARTBEAT_TAG, str(int(time.time() - 15 * 60)))
    alive = client.create_run(exp, run_name="working")
    with heartbeat(client, alive.info.run_id, every_s=0.05):  # what tracked_run keeps up while a run works
        time.sleep(0.2)
    assert abs(float(client.get_run(alive.info.run_id).data.tags[HEARTBEAT_TAG]) - time.time()) < 30
    load_runs(uri, ["heatmapbench-evaluate"])
    note = capsys.readouterr().out
    assert "left out 2 of 3 selected runs that did not finish (2 RUNNING (1 stale: no heartbeat for over 10 min))" in note
    assert "heatmapbench-runs --close" in note
    assert runs_main(["--tracking-uri", uri]) == 0
    listing = capsys.readouterr().out
    assert f"STALE  {dead.info.run_id}" in listing and f"alive  {alive.info.run_id}" in listing
    assert client.get_run(dead.info.run_id).info.status == "RUNNING"  # listing changes nothing
    assert runs_main(["--tracking-uri", uri, "--close"]) == 0
    closed = client.get_run(dead.info.run_id)
    assert closed.info.status == "KILLED" and closed.data.tags["end_reason"].startswith("stale: its process stopped")
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # a beating run is never touched


# -- stores and files that survive a full disk ----------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 MB tmpfs (root only): a disk that fills up for real."""
    import os
    import subprocess

    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` up to ``leave`` free bytes with one file; return it."""
    import os

    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "ab") as handle:
        try:
            handle.write(bytes(max(0, free - leave)))
            handle.flush()
        except OSError:
            pass
    return filler


def test_a_checkpoint_write_on_a_full_disk_keeps_the_previous_one(tiny_disk):
    import torch
    from pytorch_lightning.plugins import TorchCheckpointIO

    from heatmapbench.models.checkpoints import AtomicCheckpointIO

    small, big = {"w": torch.ones(1000)}, {"w": torch.ones(5_000_000)}  # 4 kB and 20 MB
    path = tiny_disk / "ckpt" / "best.ckpt"
    AtomicCheckpointIO().save_checkpoint(small, path)
    with pytest.raises(OSError, match=f"could not write the checkpoint {path} .*; the previous one, if any, is kept"):
        AtomicCheckpointIO().save_checkpoint(big, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], small["w"])
    assert [p.name for p in path.parent.iterdir()] == ["best.ckpt"]  # no partial file left
    # Lightning's own writer: a temporary file elsewhere, copied over, truncated by the full disk
    with pytest.raises(OSError):
        TorchCheckpointIO().save_checkpoint(big, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)


def _logger_cfg(folder: Path):
    from omegaconf import OmegaConf

    return OmegaConf.create({"_target_": "pytorch_lightning.loggers.MLFlowLogger", "experiment_name": "e",
                             "tracking_uri": f"sqlite:///{folder}/mlflow.db", "artifact_location": f"{folder}/a"})


def test_a_store_whose_creation_a_full_disk_cut_short_is_never_left_half_made(tiny_disk):
    from mlflow import MlflowClient

    from heatmapbench.app.store import StoreError, make_logger

    db = tiny_disk / "mlflow.db"
    filler = fill(tiny_disk, leave=300_000)  # a fresh store needs about 1 MB
    with pytest.raises(StoreError, match=f"could not create the MLflow store {db} .*nothing was left behind"):
        make_logger(_logger_cfg(tiny_disk)).experiment
    assert not db.exists()
    with pytest.raises(Exception):  # what MLflow alone leaves: a half-made store ...
        MlflowClient(f"sqlite:///{db}").search_experiments()
    filler.unlink()
    with pytest.raises(StoreError, match=f"left half-made .* delete {db} and rerun"):  # ... named, with the fix
        make_logger(_logger_cfg(tiny_disk)).experiment
    db.unlink()
    logger = make_logger(_logger_cfg(tiny_disk))
    assert logger.experiment.get_experiment_by_name("e") is not None


def test_a_full_disk_mid_run_ends_the_run_failed_with_one_line(eval_cfg, tiny_disk, monkeypatch, capsys):
    from heatmapbench.app import evaluate as app_evaluate
    from heatmapbench.app.plumbing import user_errors_exit

    real = app_evaluate.write_evaluation

    def disk_fills_up(*args, **kwargs):
        fill(tiny_disk)
        return real(*args, **kwargs)

    monkeypatch.setattr(app_evaluate, "write_evaluation", disk_fills_up)
    cfg = eval_cfg(f"paths.mlruns_dir={tiny_disk}/mlruns", f"paths.output_dir={tiny_disk}/out")
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.mlruns_dir, cfg.paths.output_dir = f"{tiny_disk}/mlruns", f"{tiny_disk}/out"
    with pytest.raises(SystemExit) as exit_:
        user_errors_exit(app_evaluate.run_evaluate)(cfg)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()  # also MLflow's log lines and the untrained-weights banner
    assert [line for line in err if line.startswith("error")] == err[-1:] and "Traceback" not in "".join(err)
    assert err[-1].startswith("error: the disk is full: ") and "free space and rerun" in err[-1]
    (tiny_disk / "filler").unlink()
    (run,) = runs(tiny_disk)
    assert run.info.status == "FAILED" and "No space left on device" in run.data.tags["end_reason"]


@needs_fmnist
def test_training_writes_the_aopc_tables_to_its_folder_before_logging_them(train_cfg, monkeypatch):
    from mlflow import MlflowClient

    from heatmapbench.app.train import run_train

    def server_gone(self, *args, **kwargs):
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(MlflowClient, "log_artifacts", server_gone)
    cfg = train_cfg(*TRAIN, "callbacks.aopc.artifacts=true", "test=false")
    with pytest.raises(ConnectionError):
        run_train(cfg)
    folder = Path(cfg.paths.output_dir) / "aopc" / "epoch_000"  # the evaluation before training
    assert (folder / "summary.csv").stat().st_size > 0 and (folder / "aopc_curves.csv").stat().st_size > 0
    (run,) = runs(Path(cfg.paths.mlruns_dir).parent)
    assert run.info.status == "FAILED"
