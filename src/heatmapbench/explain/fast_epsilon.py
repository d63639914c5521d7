"""epsilon-LRP in one forward and one backward pass, without Zennit's per-layer recomputation.

For a linear layer z = W x + b the epsilon rule (paper Sec. 2) is

    R_x = x * W^T (R_z / (z + eps * sign(z)))

so it is the layer's own gradient, with the incoming signal divided by the stabilised output
and the outgoing one multiplied by the input. Two autograd functions around each linear layer
(and each ``Sum`` / average pool, the Norm rule of Zennit with eps = stabilizer) turn one ordinary
backward pass into epsilon-LRP; nonlinearities and BatchNorm are bypassed so relevance passes
through them unchanged. Zennit instead re-runs every layer's forward in its backward hook.
``tests/test_explain.py`` proves the result equal to Zennit's epsilon composite on every supported
architecture and to float64 matrix-form references.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn
from zennit.canonizers import Canonizer
from zennit.layer import Sum
from zennit.types import Activation, AvgPool, BatchNorm, Linear

from .canonizers import ExactMergeBatchNorm
from .graph import BatchNormAffine


class _TimesInput(torch.autograd.Function):
    """Identity forward; backward multiplies the signal by the layer input (R_x = x * g)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x


class _DivideByStabilized(torch.autograd.Function):
    """Identity forward; backward divides by z + eps * sign(z), sign(0) = +1 as in Zennit."""

    @staticmethod
    def forward(ctx, z, eps):
        ctx.save_for_backward(z)
        ctx.eps = eps
        return z.clone()  # a fresh tensor: in-place activations after the layer must not touch z

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad / torch.where(z >= 0, z + ctx.eps, z - ctx.eps), None


def _times_input(module, inputs):
    return (_TimesInput.apply(inputs[0]), *inputs[1:])


def _divide(eps, module, inputs, output):
    return _DivideByStabilized.apply(output, eps)


class _Bypass:
    """Forward value of the module, identity gradient: relevance passes through unchanged."""

    def __init__(self) -> None:
        self.stash: dict[int, torch.Tensor] = {}

    def pre(self, module, inputs):
        self.stash[id(module)] = inputs[0]
        if getattr(module, "inplace", False):
            return (inputs[0].clone(), *inputs[1:])  # keep the original input intact
        return None

    def post(self, module, inputs, output):
        x = self.stash.pop(id(module))
        return x + (output - x).detach()


@contextmanager
def epsilon_lrp(
    model: nn.Module,
    epsilon: float,
    stabilizer: float,
    canonizers: Sequence[Canonizer],
    pass_through: tuple[type, ...],
) -> Iterator[None]:
    """Apply ``canonizers`` and the epsilon-rule hooks; undo both on exit (also on error)."""
    instances: list[Canonizer] = []
    handles = []
    bypass = _Bypass()
    try:
        for canonizer in canonizers:
            instances += canonizer.apply(model)
        merged = {id(inst.batch_norm) for inst in instances if isinstance(inst, ExactMergeBatchNorm)}
        modules = list(model.named_modules())
        # a plain ReLU needs no bypass when every consumer multiplies by its output (its relevance is 0
        # where the ReLU is 0); an unfolded BatchNorm after it would break that, so bypass ReLUs then too
        unfolded = any(isinstance(m, BatchNorm) and id(m) not in merged for _, m in modules)
        missing = []
        for name, module in modules:
            if isinstance(module, (Linear, BatchNormAffine)):  # an unfolded BatchNorm: y = s x + t
                handles.append(module.register_forward_pre_hook(_times_input))
                handles.append(module.register_forward_hook(partial(_divide, epsilon)))
            elif isinstance(module, (Sum, AvgPool)):
                handles.append(module.register_forward_pre_hook(_times_input))
                handles.append(module.register_forward_hook(partial(_divide, stabilizer)))
            elif isinstance(module, BatchNorm) and id(module) in merged:
                pass  # folded: an exact identity
            elif isinstance(module, (Activation, BatchNorm)):
                if type(module) is nn.ReLU and not unfolded:
                    continue
                handles.append(module.register_forward_pre_hook(bypass.pre))
                handles.append(module.register_forward_hook(bypass.post))
            elif not any(True for _ in module.children()) and not isinstance(module, pass_through):
                missing.append((name, module))
        if missing:
            layers = ", ".join(f"{name!r} ({type(m).__name__})" for name, m in missing)
            raise ValueError(
                f"LRP has no rule for layer {layers}. Add a (type, rule) pair to the rule table, "
                "or replace the layer by a supported one (Linear, Conv, pooling, activations, BatchNorm)."
            )
        yield
    finally:
        for handle in handles:
            handle.remove()
        bypass.stash.clear()
        for instance in reversed(instances):
            instance.remove()
