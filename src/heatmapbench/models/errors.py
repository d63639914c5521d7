"""The models' errors a user can act on (missing weights, unusable checkpoints): one line, no traceback."""

from __future__ import annotations

__all__ = ["CheckpointError", "ModelConfigError", "UnsafeCheckpointError", "WeightsNotFoundError"]


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on disk and may not be downloaded; the message says how to get them."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be used as asked; the message names the file and the fix."""


class UnsafeCheckpointError(CheckpointError):
    """The file needs code to unpickle (``weights_only=True`` refused it): it is not loaded."""


class ModelConfigError(ValueError):
    """A model's name, folder or input size cannot be used as given; the message names the setting and the fix."""
