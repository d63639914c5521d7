"""How forward passes run on the device: memory layout and numeric precision.

Two knobs, both opt-in per call and both undone on exit:

* **Layout.** oneDNN (CPU) and cuDNN (CUDA) run 2-D convolutions fastest on NHWC
  ("channels_last") tensors: on two CPU cores EfficientNet-Lite0 forwards are ~1.5× faster,
  the small CNN's ~1.9× (``benches/bench_runtime.py``). :func:`channels_last` converts a model's
  4-D parameters and buffers in place — the ``Parameter`` objects stay the same, so optimisers
  and hooks keep their references — and puts the original tensors back on exit, also on
  error, so the user's model is left exactly as it was. The results change only by float
  reassociation inside the convolution kernels.
* **Precision.** ``fp32`` (the default and the scientific reference), ``bf16`` (CPU and CUDA)
  and ``fp16`` (CUDA only) run the forward passes under :func:`torch.autocast`; scores come back
  in float32. Low precision moves AOPC values (``benches/bench_runtime.py`` measures by how
  much), so it is a speed option, never a default. On CUDA, PyTorch runs float32 convolutions
  in TF32 by default (10-bit mantissa); ``fp32`` switches that off for the duration of the
  passes, so it means IEEE float32 on every device, and ``tf32`` (CUDA only) asks for TF32
  convolutions and matrix products explicitly (``benches/bench_gpu_protocol.py`` measures both).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["PRECISIONS", "CUDA_ONLY", "LAYOUTS", "check_precision", "check_layout", "autocast",
           "float32_math", "channels_last", "uses_channels_last", "fast_model", "to_layout"]

#: Accepted values of ``precision``: autocast dtype (None: plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "tf32": None, "bf16": torch.bfloat16,
                                             "fp16": torch.float16}
#: Precisions without fast kernels on a CPU, refused there.
CUDA_ONLY = ("tf32", "fp16")
#: Accepted values of ``layout``: ``auto`` (channels_last for models with 2-D convolutions),
#: ``channels_last`` (always) and ``contiguous`` (leave the model and inputs as they are).
LAYOUTS = ("auto", "channels_last", "contiguous")

_CL = torch.channels_last


def check_precision(precision: str, device: torch.device | str | None = None) -> str:
    """Return ``precision`` if it is known and runs on ``device``; else a ``ValueError`` saying what to use."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is invalid: choose one of {', '.join(PRECISIONS)}")
    if device is not None and precision in CUDA_ONLY and torch.device(device).type != "cuda":
        raise ValueError(f"precision={precision!r} needs a CUDA device, got {torch.device(device).type}: "
                         f"CPUs have no {precision} kernels; use precision=bf16 or precision=fp32")
    return precision


def check_layout(layout: str) -> str:
    """Return ``layout`` if it is one of :data:`LAYOUTS`; else a ``ValueError``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: choose one of {', '.join(LAYOUTS)}")
    return layout


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


def uses_channels_last(model: nn.Module, layout: str = "auto") -> bool:
    """Whether ``layout`` puts ``model`` in channels_last: ``auto`` does so for any 2-D convolution."""
    if check_layout(layout) != "auto":
        return layout == "channels_last"
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def to_layout(x: Tensor, channels_last_on: bool) -> Tensor:
    """``x`` in channels_last when asked and 4-D (no copy if it already is); else ``x`` itself."""
    return x.contiguous(memory_format=_CL) if channels_last_on and x.ndim == 4 else x


def _nhwc(t: Tensor) -> Tensor:
    """4-D ``t`` with exactly the NHWC strides, a view where the memory already is NHWC.

    Size-1 dimensions make NCHW and NHWC the same memory (a first convolution on grey images,
    weight (O, 1, k, k); 1×1 kernels); PyTorch then reads the strides as NCHW, and oneDNN would
    run that convolution and everything after it in NCHW (max pooling ~10× slower). Explicit
    NHWC strides on the weight make the kernel choose NHWC whatever the input's strides.
    """
    t = t.contiguous(memory_format=_CL)
    _, c, h, w = t.shape
    nhwc = (h * w * c, 1, w * c, c)
    return t if t.stride() == nhwc else t.as_strided(t.shape, nhwc)  # same addresses


@contextlib.contextmanager
def channels_last(model: nn.Module) -> Iterator[nn.Module]:
    """Hold ``model``'s 4-D parameters and buffers in channels_last; restore the originals on exit.

    Parameters keep their identity (only ``param.data`` is swapped) and get their original
    tensors back, so values, strides, storage, ``requires_grad`` and ``.grad`` are exactly
    as before, also when the body raises. Nests: an already converted tensor is left alone.
    """
    swapped: list[tuple[nn.Module, str, bool, Tensor]] = []  # (owner, name, is_param, original)
    try:
        for module in model.modules():
            for is_param, table in ((True, module._parameters), (False, module._buffers)):
                for name, t in table.items():
                    if t is None or t.ndim != 4:
                        continue
                    converted = _nhwc(t.detach())
                    if converted.stride() == t.stride():
                        continue  # already channels_last
                    swapped.append((module, name, is_param, t.data if is_param else t))
                    if is_param:
                        t.data = converted
                    else:
                        table[name] = converted
        yield model
    finally:
        for module, name, is_param, original in reversed(swapped):
            if is_param:
                module._parameters[name].data = original
            else:
                module._buffers[name] = original


@contextlib.contextmanager
def fast_model(model: nn.Module, layout: str = "auto") -> Iterator[bool]:
    """:func:`channels_last` when ``layout`` asks for it; yields whether inputs should follow."""
    on = uses_channels_last(model, layout)
    with channels_last(model) if on else contextlib.nullcontext():
        yield on
