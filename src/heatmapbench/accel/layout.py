"""Memory layout of forward passes: channels_last for 2-D convolutions, undone on exit.

oneDNN (CPU) and cuDNN (CUDA) run 2-D convolutions fastest on NHWC ("channels_last") tensors
(``benches/bench_runtime.py`` measures by how much). :func:`channels_last` converts a model's 4-D
parameters and buffers in place — the ``Parameter`` objects stay the same, so optimisers and hooks
keep their references — and puts the original tensors back on exit, also on error, so the user's
model is left exactly as it was. The results change only by float reassociation inside the
convolution kernels.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["LAYOUTS", "channels_last", "check_layout", "fast_model", "to_layout", "uses_channels_last"]

#: Accepted values of ``layout``: ``auto`` (channels_last for models with 2-D convolutions),
#: ``channels_last`` (always) and ``contiguous`` (leave the model and inputs as they are).
LAYOUTS = ("auto", "channels_last", "contiguous")

_CL = torch.channels_last


def check_layout(layout: str) -> str:
    """Return ``layout`` if it is one of :data:`LAYOUTS`; else a ``ValueError``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is invalid: choose one of {', '.join(LAYOUTS)}")
    return layout


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
    run that convolution and everything after it in NCHW (max pooling far slower). Explicit
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
