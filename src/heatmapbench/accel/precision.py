"""Numeric precision of forward passes: float32 (the reference), bf16, fp16 and TF32.

``fp32`` (the default and the scientific reference), ``bf16`` (CPU and CUDA) and ``fp16`` (CUDA
only) run the forward passes under :func:`torch.autocast`; scores come back in float32. Low
precision moves AOPC values (``benches/bench_runtime.py`` measures by how much), so it is a speed
option, never a default. On CUDA, PyTorch runs float32 convolutions in TF32 by default (10-bit
mantissa); ``fp32`` switches that off for the duration of the passes, so it means IEEE float32 on
every device, and ``tf32`` (CUDA only) asks for TF32 convolutions and matrix products explicitly
(``benches/bench_gpu_protocol.py`` measures both).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

__all__ = ["CUDA_ONLY", "PRECISIONS", "autocast", "check_precision", "float32_math"]

#: Accepted values of ``precision``: autocast dtype (None: plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "tf32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}
#: Precisions without fast kernels on a CPU, refused there.
CUDA_ONLY = ("tf32", "fp16")


def check_precision(precision: str, device: torch.device | str | None = None) -> str:
    """Return ``precision`` if it is known and runs on ``device``; else a ``ValueError`` saying what to use."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: choose one of {', '.join(PRECISIONS)}")
    if device is not None and precision in CUDA_ONLY and torch.device(device).type != "cuda":
        raise ValueError(f"precision={precision!r} needs a CUDA device, got {torch.device(device).type}: "
                         f"CPUs have no {precision} kernels; use precision=bf16 or precision=fp32")
    return precision


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``bf16``/``fp16``; float32 math for ``fp32``/``tf32``.

    On CUDA, ``fp32`` holds cuDNN convolutions and cuBLAS matrix products in IEEE float32 and
    ``tf32`` in TF32 for the duration of the block (the global flags are restored on exit); on a
    CPU ``fp32`` changes nothing.
    """
    dtype = PRECISIONS[check_precision(precision, device)]
    if dtype is not None:
        return torch.autocast(torch.device(device).type, dtype=dtype)
    if torch.device(device).type == "cuda":
        return float32_math(tf32=precision == "tf32")
    return contextlib.nullcontext()


def _fp32_flags() -> list[tuple[object, str, object]]:
    """(owner, attribute, value) of the CUDA float32 math switches: TF32 on or off."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    new = [getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None), matmul]  # torch ≥ 2.9
    if all(hasattr(owner, "fp32_precision") for owner in new):
        # conv and rnn set alike: torch refuses to read the legacy cudnn.allow_tf32 when they differ
        return [(owner, "fp32_precision", ("ieee", "tf32")) for owner in new]
    return [(cudnn, "allow_tf32", (False, True)), (matmul, "allow_tf32", (False, True))]  # older torch


@contextlib.contextmanager
def float32_math(tf32: bool) -> Iterator[None]:
    """CUDA convolutions and matrix products in TF32 (``tf32=True``) or IEEE float32; restored on exit."""
    flags = _fp32_flags()
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in flags]
    try:
        for owner, attr, (ieee, fast) in flags:
            setattr(owner, attr, fast if tf32 else ieee)
        yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)
