"""Checkpoints of ``heatmapbench-train``: plain data only, read with ``weights_only=True``.

A checkpoint holds tensors, numbers, strings and containers of them, nothing that needs code
to unpickle: the module's hyper-parameters are plain (the optimiser partials are left out),
and :class:`RunRecord` adds the resolved training config and the MLflow run (id, store,
experiment) under ``checkpoint["heatmapbench"]``, so that ``ckpt_path=.../last.ckpt``
resumes into the same run. A file that needs more (a crafted pickle, an old checkpoint that
pickled Hydra partials) is refused without running any of its code.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from heatmapbench.models.errors import CheckpointError, UnsafeCheckpointError, WeightsNotFoundError

#: The checkpoint entry written by :class:`RunRecord`.
KEY = "heatmapbench"


def load_checkpoint(path: str | Path, what: str = "ckpt_path") -> dict[str, Any]:
    """Read a checkpoint or state-dict file with ``torch.load(weights_only=True)``; ``what``: the name
    of the argument that gave ``path``, which the errors name.

    Raises
    ------
    WeightsNotFoundError
        No file at ``path``.
    UnsafeCheckpointError
        The file holds objects that need code to unpickle; none of it ran.
    CheckpointError
        The file is not something ``torch.save`` wrote, or not a mapping.
    """
    path = Path(path).expanduser()
    given, arg = "{" + what + "}", {what: str(path)}
    if not path.is_file():
        raise WeightsNotFoundError(given + ": no such file. Checkpoints of heatmapbench-train are in "
                                   "outputs/train/runs/<time>/checkpoints/{{last,best}}.ckpt", arg)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
        raise UnsafeCheckpointError(
            given + " was not loaded: it holds objects that need code to unpickle, which could run anything "
            "({first}). heatmapbench-train writes plain checkpoints; if this file is older or from elsewhere and "
            "you trust it, re-save its state_dict with torch.save", arg, first=first or "not plain data") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(given + " is not a checkpoint torch can read: {err}", arg, err=err) from err
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(given + " holds a {kind}, not a checkpoint (a mapping)", arg,
                              kind=type(ckpt).__name__)
    return dict(ckpt)


def training_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint Lightning can resume from (weights, optimiser, loops), read safely; else ``CheckpointError``
    naming the argument ``ckpt_path`` (``path``)."""
    ckpt = load_checkpoint(path)
    missing = [k for k in ("state_dict", "optimizer_states", "loops", "epoch") if k not in ckpt]
    if missing:
        raise CheckpointError("{ckpt_path} cannot resume training: it has no {missing} entries (write it with "
                              "heatmapbench-train, whose checkpoints/last.ckpt holds the whole training state)",
                              {"ckpt_path": str(path)}, missing=missing)
    return ckpt


def recorded_run(ckpt: Mapping[str, Any]) -> dict[str, str]:
    """The MLflow run a checkpoint was written in: ``run_id``, ``tracking_uri``, ``experiment_name`` (or ``{}``)."""
    record = ckpt.get(KEY)
    run = record.get("mlflow") if isinstance(record, Mapping) else None
    return {k: str(v) for k, v in run.items() if v is not None} if isinstance(run, Mapping) else {}


class RunRecord(pl.Callback):
    """Writes the resolved config (plain containers) and the trainer's MLflow run into every checkpoint."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        run: dict[str, str] = {}
        for logger in trainer.loggers:
            if hasattr(logger, "run_id") and hasattr(logger, "_tracking_uri"):
                run = {"run_id": logger.run_id, "tracking_uri": logger._tracking_uri,
                       "experiment_name": getattr(logger, "_experiment_name", None)}
                break
        checkpoint[KEY] = {"config": self.config, "mlflow": run}


class AtomicCheckpointIO(pl.plugins.TorchCheckpointIO):
    """Checkpoints written next to their final name and renamed into place (``os.replace``).

    Lightning's own writer goes through a temporary file in the system's temp folder and *copies*
    it over when that is another file system: a full disk then leaves a truncated ``best.ckpt``.
    Here the file is written as ``.<name>.tmp-<pid>`` in the checkpoint's folder, flushed to disk,
    and renamed; a failure (a full disk) removes the partial file, keeps the previous checkpoint
    and raises an ``OSError`` naming the file. Local paths only; others go to Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        import io
        import os

        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        buffer = io.BytesIO()  # serialised first, as Lightning does: a write error is then a plain OSError
        torch.save(checkpoint, buffer)
        try:
            with open(tmp, "wb") as handle:
                handle.write(buffer.getbuffer())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            tmp.unlink(missing_ok=True)
            if isinstance(err, OSError):
                raise OSError(err.errno, f"could not write the checkpoint {path} ({err.strerror or err}); the "
                                         "previous one, if any, is kept") from err
            raise
