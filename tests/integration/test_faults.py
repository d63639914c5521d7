"""Runs that survive faults, each tried for real: signals sent to real subprocesses, real sqlite
stores, the exit status and the store's state asserted (nothing left RUNNING, a reason tag)."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from mlflow import MlflowClient

from heatmapbench.metrics import names as mn
from tests.helpers import (EVAL, TRAIN, finish, make_images, needs_fmnist, no_runs, run_main, runs, start, store,
                           wait_for_running)


# -- signals and exceptions end the run, with the right exit status ---------------------------
@pytest.mark.slow
def test_ctrl_c_during_evaluate_kills_the_run(tmp_path, images):
    signum = signal.SIGINT  # SIGTERM: the multirun test below
    proc = start(tmp_path, "evaluate", *EVAL, f"data.path={images}", "evaluation.random_repeats=400")
    wait_for_running(proc, tmp_path)
    proc.send_signal(signum)
    code, out = finish(proc)
    assert code == 128 + signum, out[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "KILLED"
    assert run.data.tags["end_reason"] == f"{signal.Signals(signum).name} received"
    assert "interrupted:" in out


@pytest.mark.slow
def test_sigterm_in_a_multirun_kills_the_job_and_stops_the_sweep(tmp_path, images):
    # 20000 random orderings keep the first job busy for minutes, so that it cannot finish (and the
    # second start) between its run appearing and the signal; the signal ends it within seconds
    proc = start(tmp_path, "evaluate", "-m", *EVAL, f"data.path={images}", "evaluation.random_repeats=20000",
                 "evaluation.region_size=4,8")
    wait_for_running(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 143, out[-3000:]
    (run,) = runs(tmp_path)  # the second job never started
    assert run.info.status == "KILLED"


@needs_fmnist
@pytest.mark.slow
def test_sigterm_during_train_kills_the_run_and_exits_143(tmp_path, data_dir):
    proc = start(tmp_path, "train", *TRAIN, f"paths.data_dir={data_dir}", "trainer.max_epochs=50", "trainer.limit_train_batches=50")
    wait_for_running(proc, tmp_path)
    time.sleep(2)  # inside Lightning's fit, where its own SIGTERM handler runs first
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 143, out[-3000:]
    (run,) = runs(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["end_reason"] == "SIGTERM received"


# -- resume: same run, continued optimiser/epoch/step, AOPC history without gaps or duplicates --
@needs_fmnist
@pytest.mark.slow
def test_resume_continues_the_same_run(train_cfg):
    from heatmapbench.models.checkpoints import KEY, load_checkpoint
    from heatmapbench.app.train import run_train

    first = run_train(train_cfg(*TRAIN))
    last = Path(train_cfg(*TRAIN).paths.output_dir) / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)  # weights_only=True: plain data only
    assert ckpt[KEY]["mlflow"]["run_id"] == first["run_id"] and ckpt["epoch"] == 0
    assert ckpt[KEY]["config"]["trainer"]["max_epochs"] == 1
    assert "optimizer" not in ckpt["hyper_parameters"]
    cfg = train_cfg(*TRAIN, "trainer.max_epochs=2", f"ckpt_path={last}")
    second = run_train(cfg)
    assert second["run_id"] == first["run_id"]
    client = MlflowClient(f"sqlite:///{cfg.paths.mlruns_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.logger.experiment_name).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    assert "trainer.max_epochs" in run.data.tags["resume_1_changed"] and run.data.params["trainer.max_epochs"] == "1"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, mn.explainer_metric("aopc", "sensitivity_l2"))]
    val_steps = [m.step for m in client.get_metric_history(run.info.run_id, mn.VAL_ACC) if m.step > 0]  # 0: untrained
    assert val_steps == [val_steps[0], val_steps[0] + 3]  # one per epoch; the global step continued (3 batches)
    assert sorted(steps) == [0, *val_steps]  # before training once, then at each epoch's val/acc step
    epochs = [m.value for m in client.get_metric_history(run.info.run_id, mn.EPOCH)]
    assert sorted(epochs) == [0.0, 1.0, 2.0]
    resumed = load_checkpoint(last)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 2 * ckpt["global_step"]
    assert resumed["optimizer_states"][0]["state"][0]["step"] == 2 * ckpt["optimizer_states"][0]["state"][0]["step"]


# -- checkpoints are plain data, loaded with weights_only=True ---------------------------------
class _Payload:
    """Unpickling this calls ``os.system``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_checkpoint_runs_no_code(tmp_path, train_cfg):
    import torch

    from heatmapbench.models import SmallCNN
    from heatmapbench.models.checkpoints import UnsafeCheckpointError
    from heatmapbench.models.zoo import from_checkpoint
    from heatmapbench.app.train import run_train

    marker = tmp_path / "pwned"
    crafted = tmp_path / "last.ckpt"
    torch.save({"state_dict": SmallCNN().state_dict(), "epoch": 0, "loops": {}, "optimizer_states": [],
                "hyper_parameters": {"x": _Payload(marker)}}, crafted)
    with pytest.raises(UnsafeCheckpointError, match="need code to unpickle"):
        from_checkpoint(str(crafted), SmallCNN())
    cfg = train_cfg(*TRAIN, f"ckpt_path={crafted}")
    with pytest.raises(UnsafeCheckpointError, match="ckpt_path="):
        run_train(cfg)
    assert not marker.exists()
    assert not Path(cfg.paths.mlruns_dir).exists()  # refused before any run (or store) exists
    # the same object does run code when unpickled without the allow-list: the test is sound
    torch.load(crafted, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("overrides, message", [
    (["evaluation.region_size=40"], r"evaluation.region_size=40 is invalid: larger than the data's 32×32 images"),
    (["evaluation.steps=100"], r"evaluation.steps=100 is invalid: the data's 32×32 images have only 64 grid regions"),
    (["model.net.in_channels=1"], r"the model does not take the data's \(3, 32, 32\) images"),
    (["model.num_classes=2"], r"the model has 2 outputs but the data has 3 classes"),
    (["logger.run_id=abc"], r"logger.run_id='abc' is invalid here"),
])
def test_evaluate_refuses_before_the_run(eval_cfg, overrides, message):
    from heatmapbench.app.schema import ConfigError
    from heatmapbench.app.evaluate import run_evaluate

    cfg = eval_cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        run_evaluate(cfg)
    assert no_runs(cfg)


@needs_fmnist
def test_train_refuses_regions_larger_than_its_images(train_cfg):
    from heatmapbench.app.schema import ConfigError
    from heatmapbench.app.train import run_train

    cfg = train_cfg(*TRAIN, "evaluation.region_size=40")
    with pytest.raises(ConfigError, match="evaluation.region_size=40 is invalid: larger than the data's 28×28"):
        run_train(cfg)
    assert no_runs(cfg)


def test_unreachable_server_fails_fast_naming_the_uri():
    from heatmapbench.app.schema import ConfigError
    from heatmapbench.app.preflight import check_tracking_store

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    start_s = time.monotonic()
    with pytest.raises(ConfigError, match=f"logger.tracking_uri='{uri}': no MLflow server answers there"):
        check_tracking_store(uri, timeout=2.0)
    assert time.monotonic() - start_s < 10  # bounded retries, not minutes


def test_unwritable_artifact_folder_fails_before_the_run(eval_cfg, tmp_path):
    from heatmapbench.app.schema import ConfigError
    from heatmapbench.app.evaluate import run_evaluate

    (tmp_path / "a_file").write_text("")
    cfg = eval_cfg(f"logger.artifact_location={tmp_path}/a_file/artifacts")
    with pytest.raises(ConfigError, match="logger.artifact_location=.* cannot write to"):
        run_evaluate(cfg)
    assert no_runs(cfg)


def test_failure_while_logging_the_config_fails_the_run(eval_cfg, monkeypatch):
    from heatmapbench.app import tracking  # where tracked_run looks it up
    from heatmapbench.app.evaluate import run_evaluate

    def broken(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(tracking, "log_config", broken)
    cfg = eval_cfg()
    with pytest.raises(OSError):
        run_evaluate(cfg)
    (run,) = runs(Path(cfg.paths.mlruns_dir).parent)
    assert run.info.status == "FAILED" and run.data.tags["end_reason"] == "OSError: No space left on device"


def test_untrained_weights_warn_and_are_tagged(eval_cfg, capfd):
    from heatmapbench.app.evaluate import run_evaluate

    cfg = eval_cfg()
    result = run_evaluate(cfg)
    assert "WARNING: model=SmallCNN has untrained (randomly initialised) weights" in capfd.readouterr().err
    (run,) = runs(Path(cfg.paths.mlruns_dir).parent)
    assert run.info.run_id == result["run_id"] and run.data.tags["weights"] == "untrained"


@needs_fmnist
@pytest.mark.slow
def test_cli_exit_status_user_error_2_exception_1(tmp_path, images, data_dir):
    proc = start(tmp_path / "a", "evaluate", *EVAL, f"data.path={images}", "evaluation.region_size=40")
    code, out = finish(proc)
    assert code == 2 and "error: evaluation.region_size=40 is invalid" in out, out[-3000:]
    assert not (tmp_path / "a" / "mlruns" / "mlflow.db").exists()
    proc = start(tmp_path / "b", "train", *TRAIN, f"paths.data_dir={data_dir}",
                 "+callbacks.boom._target_=tests.integration.test_faults.Boom")
    code, out = finish(proc, timeout=300)
    assert code == 1, out[-3000:]
    (run,) = runs(tmp_path / "b")
    assert run.info.status == "FAILED" and run.data.tags["end_reason"] == "RuntimeError: boom"


class Boom(pl.Callback):
    """Fails after the first training epoch."""

    def on_train_epoch_end(self, trainer, pl_module):
        raise RuntimeError("boom")


# -- unreadable and missing images ------------------------------------------------------------
@pytest.fixture
def broken_images(tmp_path) -> Path:
    root = make_images(tmp_path / "broken")
    (root / "class1" / "9.png").write_bytes(b"not an image")
    return root


def _one_error_line(err: str) -> str:
    """The one line a user error prints (``error: ...``); no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_an_unreadable_image_fails_before_any_work_naming_it(eval_cfg, broken_images):
    cfg = eval_cfg(f"data.path={broken_images}")
    code, err = run_main("evaluate", cfg)  # the command's main, as the CLI runs it
    line = _one_error_line(err)
    assert code == 2 and re.search(r"cannot read the image .*class1/9.png; .*pass data.skip_unreadable=true to", line)
    assert no_runs(cfg)


@pytest.mark.parametrize("case", ["imagefolder without train_path", "fashion_mnist files missing"])
def test_train_data_errors_are_one_line_naming_data_keys(train_cfg, images, tmp_path, monkeypatch, case):
    """Errors found while the training data is read: one line naming the ``data.`` keys, exit 2, no run."""
    from heatmapbench.data import FashionMNISTDataModule

    if case == "imagefolder without train_path":
        cfg = train_cfg("data=imagefolder", f"data.path={images}")
        head, fix = "error: imagefolder: training needs data.train_path, a class-folder tree", "(data.path holds"
    else:
        monkeypatch.setattr(FashionMNISTDataModule, "offline_sources", ())
        cfg = train_cfg(f"data.data_dir={tmp_path / 'empty'}")
        head, fix = "error: fashion_mnist: dataset files not found.", "pass data.download=true (needs internet)"
    code, err = run_main("train", cfg)
    line = _one_error_line(err)
    assert code == 2 and line.startswith(head) and fix in line, line
    assert no_runs(cfg)


#: Models built wrongly in one way each, through a command: its overrides, and what its one error line
#: says (the library's message with the config keys in place of the builder's arguments).
MODEL_ERRORS = {
    "ckpt_path of no file": ("evaluate", ["ckpt_path={tmp}/none.ckpt"],
                             r"checkpoint: no file at \S+none.ckpt \(ckpt_path\); point it at a .ckpt file"),
    "model=checkpoint of another head width": (
        "evaluate", ["model=checkpoint", "model.net.ckpt_path={ten}", "model.num_classes=3", "model.net.net.in_channels=3",
                     "+model.net.net.image_size=32"],
        r"model.net.ckpt_path=\S+ten.ckpt has a 10-way head but the net is built with model.num_classes=3: fine-tune "
        r"a fresh 3-way head on the checkpoint's other weights \(heatmapbench-train head=adapt\), or use 10 outputs"),
    "train head=keep on a checkpoint of another head width": (
        "train", ["model=checkpoint", "model.net.ckpt_path={ten}", "model.num_classes=3", "model.net.net.in_channels=3",
                  "+model.net.net.image_size=32", "head=keep", "data.train_path={images}"],
        r"model.net.ckpt_path=\S+ten.ckpt has a 10-way head .*\(heatmapbench-train head=adapt\)"),
    "torchvision weights not cached": ("evaluate", ["model=vgg16"],
                                       r"vgg16: pretrained IMAGENET1K_V1 weights not found at "),
    "timm name unknown": ("evaluate", ["model=timm", "model.net.name=nope_netx"],
                          r"model.net.name=nope_netx is not a timm model; timm.list_models"),
    "imagenet_samples resize": ("evaluate", ["data=imagenet_samples", "preprocessing_from_model=false",
                                             "data.resize=100", "data.image_size=200"],
                                r"data.resize=100 is invalid: must be >= image_size=200 \(imagenet_samples\)"),
}


@pytest.mark.parametrize("case", list(MODEL_ERRORS))
def test_model_errors_are_one_line_naming_config_keys(tmp_path, data_dir, images, monkeypatch, case):
    """A model (or data) argument refused by the library, through the command's main: one line naming
    the config keys that set it, exit 2, no run."""
    from heatmapbench.models import SmallCNN
    from tests.helpers import SHRUNK_TRAIN, compose_config

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_hub"))  # no cached torchvision weights
    torch.save({"state_dict": {f"net.{k}": v for k, v in SmallCNN(in_channels=3, num_classes=10, image_size=32)
                               .state_dict().items()}}, tmp_path / "ten.ckpt")
    command, overrides, message = MODEL_ERRORS[case]
    overrides = [o.format(tmp=tmp_path, ten=tmp_path / "ten.ckpt", images=images) for o in overrides]
    base = SHRUNK_TRAIN + TRAIN if command == "train" else [o for o in EVAL if not o.startswith(("model", "+model"))]
    if not any(o.startswith("data=") for o in overrides):
        base = [o for o in base if not o.startswith("data=")] + ["data=imagefolder", f"data.path={images}",
                                                                 "data.image_size=32", "data.resize=32"]
    cfg = compose_config(command, base + overrides, tmp_path, data_dir)
    code, err = run_main(command, cfg)
    line = _one_error_line(err)
    assert code == 2 and re.match(f"error: {message}", line), err[-2000:]
    assert no_runs(cfg)
    if case == "torchvision weights not cached":  # the fixes, on the lines after it
        assert all(fix in err for fix in ("pass model.net.allow_download=true (needs internet",
                                          "pass model.net.weights_path=/path/to/state_dict.pth;",
                                          "or model.net.weights=null for a randomly initialised network")), err


def test_skip_unreadable_leaves_them_out_and_lists_them_in_the_run(eval_cfg, broken_images, tmp_path):
    import mlflow

    from heatmapbench.app.evaluate import run_evaluate

    cfg = eval_cfg(f"data.path={broken_images}", "data.skip_unreadable=true")
    result = run_evaluate(cfg)
    (run,) = runs(Path(cfg.paths.mlruns_dir).parent)
    assert run.info.status == "FINISHED" and result[mn.IMAGES] == 12  # the 12 readable ones
    assert run.data.tags["skipped_images"] == "1"
    listed = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="skipped_images.txt",
                                                 tracking_uri=store(Path(cfg.paths.mlruns_dir).parent),
                                                 dst_path=str(tmp_path / "dl"))
    assert Path(listed).read_text() == "class1/9.png\n"


@pytest.mark.parametrize("layout", ["no class folders", "empty class folders"])
def test_an_empty_folder_is_a_one_line_error(eval_cfg, tmp_path, layout):
    from heatmapbench.data import DataNotFoundError
    from heatmapbench.app.evaluate import run_evaluate

    root = tmp_path / "empty"
    (root / ("a" if layout == "empty class folders" else "")).mkdir(parents=True)
    cfg = eval_cfg(f"data.path={root}")
    with pytest.raises(DataNotFoundError, match=f"imagefolder: no images under {root}; it must hold") as err:
        run_evaluate(cfg)
    assert "\n" not in str(err.value)
    assert no_runs(cfg)


# -- the library API refuses bad batches with a clear ValueError ------------------------------
class _Counting(torch.nn.Module):
    """A 3-class linear model that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("case, message", [
    ("target 999", r"target holds class 999, outside the model's classes \[0, 3\)"),
    ("target -1", r"target holds class -1; classes are indices ≥ 0"),
    ("empty", r"x is an empty batch \(B = 0\)"),
    ("inf", r"x contains NaN or inf"),
    ("nan", r"x contains NaN or inf"),
])
def test_engine_refuses_bad_batches_before_perturbing(case, message):
    from heatmapbench.evaluation import EvaluationSettings
    from heatmapbench.evaluation import evaluate_batch
    from heatmapbench.explain import get_explainer
    from heatmapbench.perturbation import region_perturbation

    x = torch.rand(2, 3, 8, 8)
    target = None
    if case.startswith("target"):
        target = torch.tensor([0, int(case.split()[1])])
    elif case == "empty":
        x = x[:0]
    else:
        x[1, 0, 2, 2] = float(case)
    model = _Counting()
    with pytest.raises(ValueError, match=message):
        region_perturbation(model, x, torch.rand(x.shape[0], 8, 8), target=target, region_size=2, steps=3)
    # at most the unperturbed forwards (the automatic batch size's one-image probe, then the clean
    # images), never a perturbed one
    assert model.calls <= (2 if case == "target 999" else 0)
    model.calls = 0
    settings = EvaluationSettings(explainers=["sensitivity_l2"], region_size=2, steps=3, random_repeats=1)
    with pytest.raises(ValueError, match=message):
        evaluate_batch(model, x, {"s": get_explainer("sensitivity_l2")}, settings, "uniform", target=target)
    assert model.calls <= (1 if case == "target 999" else 0)
