"""Helpers shared by the tests: the real configs composed like the commands do, CLI subprocess
environments, small reference models and computations, and the fault tests' tiny runs.

Tests import from here (and fixtures come from the conftest files); no test imports another test.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from mlflow import MlflowClient
from omegaconf import DictConfig, open_dict
from PIL import Image
from torch import nn

import heatmapbench
from heatmapbench.data.torchvision_sets import DEBIAN_FASHION_MNIST
from heatmapbench.registry import conf_dir


REPO = Path(__file__).resolve().parents[1]
#: The package's source folder (the one under test).
PACKAGE = Path(heatmapbench.__file__).resolve().parent


def is_shim(source: str) -> bool:
    """A module's source is a deprecation shim (it only forwards an old path for one release)."""
    return "from heatmapbench._moved import moved" in source or (
        source.lstrip().startswith('"""``python -m heatmapbench.') and "keeps working" in source)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: the package under test (not another install of it) and
    the repository (for ``tests``) first on the path."""
    path = os.pathsep.join([str(Path(heatmapbench.__file__).resolve().parents[1]), str(REPO)])
    return {**os.environ, "PYTHONPATH": path, **extra}


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


def run_main(command: str, cfg: DictConfig) -> tuple[int, str]:
    """Run the ``main`` of ``heatmapbench-<command>`` on ``cfg`` (composed by :func:`compose_config`) in this
    process, as the CLI runs it once Hydra has composed the config (Hydra hands a given config straight
    to the function it decorates): the exit status (0 when it returns) and what it wrote to stderr.

    Checks a command's many bad inputs without paying a new interpreter each; the CLI's own wiring
    (Hydra parsing the command line, the exit status of the process) is checked by a subprocess test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            importlib.import_module(f"heatmapbench.app.{command}").main(cfg)
        except SystemExit as exit_:
            return exit_.code, err.getvalue()
    return 0, err.getvalue()


#: The real ``train`` config shrunk (the ``train_cfg`` fixture's base): CPU, few batches, no progress output.
SHRUNK_TRAIN = ["trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=8", "trainer.limit_val_batches=2",
                "trainer.limit_test_batches=2", "trainer.enable_model_summary=false",
                "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "data.eval_subset_size=16"]


def build_option(group: str, name: str, *overrides: str):
    """What ``<group>=<name>`` (with ``overrides``) builds in the commands: the node Hydra composes
    in the ``evaluate`` config, instantiated."""
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="evaluate", overrides=[f"{group}={name}", *overrides])
        return instantiate(cfg[group], _convert_="all")
    finally:
        GlobalHydra.instance().clear()


def store_uri(cfg: DictConfig) -> str:
    return f"sqlite:///{cfg.paths.mlruns_dir}/mlflow.db"


needs_fmnist = pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(),
                                  reason="Debian's dataset-fashion-mnist is not installed (make data)")


def tiny_net(c: int = 3, h: int = 10, w: int = 10, k: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * h * w, k)).double()


def ref_impute(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Direct sparse solve of ROAD's linear imputation (weights of Rong et al. / grad-cam)."""
    c, h, w = img.shape
    nbrs = [(dy, dx, 1 / 6 if dy == 0 or dx == 0 else 1 / 12)
            for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    ids = -np.ones((h, w), dtype=int)
    pts = list(zip(*np.nonzero(removed)))
    for n, (y, x) in enumerate(pts):
        ids[y, x] = n
    a = scipy.sparse.lil_matrix((len(pts), len(pts)))
    rhs = np.zeros((len(pts), c))
    for n, (y, x) in enumerate(pts):
        for dy, dx, wt in nbrs:
            yy, xx = y + dy, x + dx
            if 0 <= yy < h and 0 <= xx < w:
                a[n, n] += wt
                if removed[yy, xx]:
                    a[n, ids[yy, xx]] -= wt
                else:
                    rhs[n] += wt * img[:, yy, xx]
    out = img.copy()
    if pts:
        sol = scipy.sparse.linalg.spsolve(a.tocsc(), rhs).reshape(len(pts), c)
        for n, (y, x) in enumerate(pts):
            out[:, y, x] = sol[n]
    return out


# ------------------------------------------------------------------------ oracle and seeds
def linear_setup(b=16, h=16, w=16, c=1, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(c * h * w, k)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(k, c * h * w, generator=g))
        lin.bias.zero_()
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.rand(b, c, h, w, generator=g)
    tgt = model(x).argmax(1)
    wt = lin.weight.detach()[tgt].view(b, c, h, w)
    return model, x, (wt * x).sum(1), tgt  # heatmap exactly w ⊙ x (summed over channels)


def snapshot(model: nn.Module, copy: bool = True) -> dict:
    """Everything an explainer could leave behind on a model. ``copy=False``: the live tensors instead
    of copies, for the snapshot compared at once with an earlier one (a full-size net is not copied
    again after every method)."""
    hook_dicts = [k for k in vars(nn.Module()) if "hook" in k]
    return {
        "state": {k: v.detach().clone() if copy else v.detach() for k, v in model.state_dict(keep_vars=True).items()},
        "params": [(n, id(p), p.requires_grad, p.grad) for n, p in model.named_parameters()],
        "modules": [
            (name, m.training, sorted(vars(m)), list(m._modules), {k: dict(getattr(m, k) or {}) for k in hook_dicts})
            for name, m in model.named_modules()
        ],
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["params"] == after["params"]
    assert before["modules"] == after["modules"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


def gradient_x_input(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(out[torch.arange(len(x)), target].sum(), x)
    return (grad * x).sum(1)  # (B, H, W)


#: A tiny evaluation on a 32×32 RGB image folder with an untrained small CNN, long enough to be
#: interrupted (many random orderings), quick to start.
EVAL = ["data=imagefolder", "data.image_size=32", "data.resize=32", "data.batch_size=8", "model=small_cnn",
        "model.num_classes=3", "model.net.in_channels=3", "+model.net.image_size=32", "evaluation=small_images",
        "evaluation.explainers=[sensitivity_l2]", "device=cpu", "progress=false", "evaluation.n_boot=50", "gallery_size=0"]


#: A debug training: few batches, one cheap AOPC explainer on 4 images, no artifacts.
TRAIN = ["trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "callbacks.progress_bar=null", "data.eval_subset_size=4", "data.batch_size=32",
         "evaluation.explainers=[sensitivity_l2]", "evaluation.steps=4", "evaluation.random_repeats=1",
         "callbacks.aopc.artifacts=false", "callbacks.aopc.log_complexity=false"]


def make_images(root: Path, classes: int = 3, per_class: int = 4, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def store(tmp: Path) -> str:
    return f"sqlite:///{tmp}/mlruns/mlflow.db"


def runs(tmp: Path) -> list:
    client = MlflowClient(store(tmp))
    return sorted(client.search_runs([e.experiment_id for e in client.search_experiments()]),
                  key=lambda r: r.info.start_time)


def no_runs(cfg) -> bool:
    db = Path(cfg.paths.mlruns_dir) / "mlflow.db"
    if not db.is_file():
        return True
    with contextlib.closing(sqlite3.connect(db)) as con:
        return con.execute("select count(*) from runs").fetchone()[0] == 0


ENV = cli_env(HYDRA_FULL_ERROR="0")


def start(tmp: Path, module: str, *overrides: str) -> subprocess.Popen:
    tmp.mkdir(parents=True, exist_ok=True)
    flags = [o for o in overrides if o.startswith("-")]  # Hydra wants -m before the overrides
    args = [sys.executable, "-m", f"heatmapbench.app.{module}", *flags, f"paths.mlruns_dir={tmp}/mlruns",
            f"hydra.run.dir={tmp}/out", f"hydra.sweep.dir={tmp}/multirun",
            *(o for o in overrides if not o.startswith("-"))]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=tmp)


def wait_for_running(proc: subprocess.Popen, tmp: Path, timeout: float = 240.0) -> None:
    """Block until the process has an MLflow run RUNNING in its store (read with plain sqlite)."""
    db = tmp / "mlruns" / "mlflow.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before its run started:\n{proc.stdout.read()[-3000:]}")
        if db.is_file():
            with contextlib.suppress(sqlite3.OperationalError), contextlib.closing(sqlite3.connect(db, timeout=1)) as con:
                if con.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]:
                    return
        time.sleep(0.1)
    proc.kill()
    pytest.fail("no RUNNING run appeared")


def finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out
