"""Checks made before an MLflow run exists: what can be found wrong cheaply fails here, in one line.

The entry points call these after building the model and the data and before opening the
run: the tracking store and the artifact folder are usable (an HTTP server answers within
about 10 s), the evaluation's regions fit the data's images, the model takes the data's
images and has an output per class (a forward of one image), the model's optimiser can be
built, and the model's weights were loaded from somewhere (else a loud warning and a
``weights=untrained`` tag).
"""

from __future__ import annotations

import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from torch import nn

from heatmapbench.app.schema import ConfigError
from heatmapbench.app.store import sqlite_path
from heatmapbench.perturbation.regions import max_regions

#: How long to wait for an HTTP tracking server before giving up (a few bounded tries).
STORE_TIMEOUT_S = 10.0


def _writable_folder(folder: Path, key: str, value: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".heatmapbench-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"{key}={value!r} is invalid: cannot write to {folder} ({err.strerror or err}); "
                          f"point {key} at a writable folder") from err


def check_output_folder(config: Any, key: str) -> None:
    """The Hydra run (or sweep) folder ``key`` of ``config`` can be created and written, else ``SystemExit(2)``
    after one ``error:`` line: Hydra creates it before any entry point runs, and would print a traceback."""
    from omegaconf import OmegaConf

    folder = str(OmegaConf.select(config, key))
    try:
        _writable_folder(Path(folder), key, folder)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from err


class OutputFolderCheck(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): :func:`check_output_folder` before a run or a sweep."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:  # noqa: D102
        check_output_folder(config, "hydra.run.dir")

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:  # noqa: D102
        check_output_folder(config, "hydra.sweep.dir")


def _server_answers(uri: str, timeout: float) -> None:
    """Raise ``ConfigError`` unless an HTTP server answers at ``uri`` within ``timeout`` seconds."""
    url = uri.rstrip("/") + "/health"
    deadline = time.monotonic() + timeout
    reason = "no answer"
    attempt = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            with urllib.request.urlopen(url, timeout=min(3.0, left)) as answer:
                body = answer.read(64)
            if body.strip() == b"OK":  # what an MLflow server's /health says
                return
            raise ConfigError(f"logger.tracking_uri={uri!r}: the server there is not an MLflow tracking server "
                              f"({url} answered {body[:40]!r}, not 'OK'); point it at mlflow server's address")
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):  # behind authentication: reachable, the client's credentials decide
                return
            raise ConfigError(f"logger.tracking_uri={uri!r}: the server there is not an MLflow tracking server "
                              f"({url} answered HTTP {err.code}); point it at mlflow server's address") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = str(getattr(err, "reason", err))
        attempt += 1
        time.sleep(max(0.0, min(0.5 * attempt, deadline - time.monotonic())))
    raise ConfigError(f"logger.tracking_uri={uri!r}: no MLflow server answers there within {timeout:.0f} s "
                      f"({reason}); start it (mlflow server ...), fix the address, or drop the override to use "
                      "the local sqlite store")


def check_tracking_store(uri: str, artifact_location: str | None = None, timeout: float = STORE_TIMEOUT_S) -> None:
    """The store can be written (sqlite: its folder; HTTP: the server answers) and so can the artifact folder."""
    uri = str(uri)
    path = sqlite_path(uri)
    if path is not None:
        _writable_folder(path.parent, "logger.tracking_uri", uri)
        if path.is_dir():
            raise ConfigError(f"logger.tracking_uri={uri!r} is invalid: {path} is a folder; name the database file")
    elif uri.startswith(("http://", "https://")):
        _server_answers(uri, timeout)
    if artifact_location and ("://" not in str(artifact_location) or str(artifact_location).startswith("file://")):
        folder = Path(str(artifact_location).removeprefix("file://"))
        _writable_folder(folder, "logger.artifact_location", str(artifact_location))


def check_logger(logger_cfg: Any, allow_run_id: bool = False) -> None:
    """:func:`check_tracking_store` for a ``logger`` config node; ``logger.run_id`` only where resuming is possible."""
    if logger_cfg.get("run_id") and not allow_run_id:
        raise ConfigError(f"logger.run_id={logger_cfg.run_id!r} is invalid here: only heatmapbench-train continues an "
                          "existing run (resuming from ckpt_path=.../last.ckpt); drop the override")
    check_tracking_store(logger_cfg.tracking_uri, logger_cfg.get("artifact_location"))


def check_regions_fit(settings: Any, image_shape: tuple[int, ...], where: str = "evaluation") -> None:
    """``region_size`` and ``steps`` fit the data's ``(C, H, W)`` images (what the engine would refuse later)."""
    h, w = int(image_shape[-2]), int(image_shape[-1])
    p = int(settings.region_size)
    if p > min(h, w):
        raise ConfigError(f"{where}.region_size={p} is invalid: larger than the data's {h}×{w} images; "
                          f"use {where}.region_size ≤ {min(h, w)}")
    most = max_regions(h, w, p, settings.regions)
    if int(settings.steps) > most:
        raise ConfigError(f"{where}.steps={settings.steps} is invalid: the data's {h}×{w} images have only {most} "
                          f"{settings.regions} regions of {p}×{p}; use {where}.steps ≤ {most} or a smaller "
                          f"{where}.region_size")


def check_model_fits_data(net: nn.Module, x: torch.Tensor, num_classes: int | None, exact: bool) -> int:
    """Forward one image ``x (1, C, H, W)``; the net must return ``(1, K)`` with ``K`` = (or ≥) the data's classes.

    Returns ``K``. ``exact``: training needs one output per class; an evaluation may score a
    subset of a larger label space (an ImageNet model on a few class folders).
    """
    from heatmapbench.perturbation.engine import eval_mode

    try:
        with eval_mode(net), torch.no_grad():
            out = net(x)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"the model does not take the data's {tuple(x.shape[1:])} images ({first}); match the "
                          "model's input channels/size to the data (e.g. model.net.in_channels)") from err
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise ConfigError(f"the model returns shape {tuple(out.shape)} for one image; it must return (1, classes) scores")
    if not bool(torch.isfinite(out).all()):
        raise ConfigError("the model's scores are not finite (NaN or inf) for the data's first image: its weights or "
                          "its input normalisation are broken (the model, not an explainer); check the weights file "
                          "or checkpoint")
    k = int(out.shape[1])
    if num_classes is not None and (k != num_classes if exact else k < num_classes):
        raise ConfigError(f"the model has {k} outputs but the data has {num_classes} classes; set "
                          f"model.num_classes={num_classes} (and the net's num_classes)")
    return k


def check_optimizer(model: Any) -> None:
    """Build the optimiser (and scheduler) of a ``ClassifierModule`` on its parameters, as training will.

    A bad ``model.optimizer`` / ``model.scheduler`` override (a negative learning rate, an
    argument the class does not take) then fails here, before any run exists, instead of when
    Lightning calls ``configure_optimizers``. Building one allocates no state (that comes with
    the first step). Other modules are left to Lightning.
    """
    from heatmapbench.models.classifier import ClassifierModule

    if not isinstance(model, ClassifierModule):
        return
    try:
        model.configure_optimizers()
    except (ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.optimizer / model.scheduler cannot be built: {first}; fix the override "
                          "(e.g. model.optimizer.lr=0.001, or model.optimizer._target_=torch.optim.Adam with "
                          "arguments it takes)") from err


def weights_source(net: nn.Module) -> str | None:
    """Where ``net``'s weights were loaded from (set by the model zoo and checkpoint loading), or ``None``."""
    return getattr(net, "weights_source", None)


def warn_untrained(what: str) -> None:
    """A loud warning on stderr that ``what`` is evaluated with its random initial weights."""
    bar = "!" * 78
    print(f"{bar}\nWARNING: {what} has untrained (randomly initialised) weights: its heatmaps and AOPC say\n"
          "nothing about a trained classifier. Pass ckpt_path=<heatmapbench-train checkpoint> or a pretrained\n"
          f"model (model=vgg16, ...). The MLflow run is tagged weights=untrained.\n{bar}", file=sys.stderr, flush=True)
