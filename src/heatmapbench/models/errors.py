"""The models' errors a user can act on (missing weights, unusable checkpoints): one line, no traceback.

Each names the arguments of the function that raised it (``pass weights_path=...``) and carries
them (:class:`~heatmapbench.errors.ArgumentError`), so a command that built the model from its
config reads the same message naming its config keys instead.
"""

from __future__ import annotations

from heatmapbench.errors import ArgumentError

__all__ = ["CheckpointError", "ModelConfigError", "UnsafeCheckpointError", "WeightsNotFoundError"]


class WeightsNotFoundError(ArgumentError, FileNotFoundError):
    """Pretrained weights are not on disk and may not be downloaded; the message says how to get them."""


class CheckpointError(ArgumentError, ValueError):
    """A checkpoint file cannot be used as asked; the message names the file and the fix."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs code to unpickle (``weights_only=True`` refused it): it is not loaded."""


class ModelConfigError(ArgumentError, ValueError):
    """A model's name, folder or input size cannot be used as given; the message names the argument and the fix."""
