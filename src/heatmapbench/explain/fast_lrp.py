"""LRP rules as single autograd functions: one forward and one backward pass, no re-forward per layer.

Drop-in replacements of Zennit's rule hooks (same names and parameters: :class:`Epsilon`,
:class:`Norm`, :class:`AlphaBeta`, :class:`ZPlus`, :class:`Gamma`, :class:`Flat`, :class:`Pass`), for use in a Zennit
composite. Zennit's rules store every layer's input in the forward pass and, in the backward pass,
re-run the layer once per term of the rule (four times for alpha-beta) and differentiate those
forwards. Here the forward pass computes what the rule needs beside the layer's own output, and one
ordinary backward pass then yields the relevance. Edges of the autograd graph carry relevance.

For a linear layer ``z = W x + b`` (paper Sec. 2, Bach et al. 2015):

* epsilon: ``R_x = x * W^T (R / (z + eps sign z))`` is the layer's own gradient with the signal
  divided by the stabilised output and multiplied by the input (two identity-forward functions
  around the unchanged layer). ``Norm`` (sums, average pools) is the same with ``eps`` = stabilizer.
* alpha-beta: with ``z+ = W+ x+ + W- x- + b+`` and ``z- = W- x+ + W+ x- + b-``,
  ``R_x = x+ * (a W+^T s+ - b W-^T s-) + x- * (a W-^T s+ - b W+^T s-)``, ``s+- = R / stab(z+-)``.
  The layer runs once more with the weights ``[W+; W-]`` stacked along its outputs, on ``x`` (or,
  when ``x`` has negative entries, on ``x+`` and ``x-`` stacked along the batch); the backward of
  that one call with the signal ``[a s+, -b s-]`` (crossed for ``x-``) is the whole rule. ``ZPlus``
  is alpha = 1, beta = 0 and stacks ``W+`` only when ``x >= 0``.
* gamma (generalised, Montavon et al. 2019; Andéol et al. 2021): with ``W^ = W + g W+`` and
  ``Wv = W + g W-``, a unit with ``z > 0`` redistributes over ``zu = W^ x+ + Wv x- + b + g b+`` and one
  with ``z < 0`` over ``zd = Wv x+ + W^ x- + b + g b-``:
  ``R_x = x+ * (W^^T su + Wv^T sd) + x- * (Wv^T su + W^^T sd)``, ``su = [z > 0] R / (zu + eps)``,
  ``sd = [z < 0] R / (zd - eps)``. ``g = 0`` is the epsilon rule. The layer runs once more, as for
  alpha-beta, with ``[[W^, Wv]; [Wv, W^]]`` on ``x+`` and ``x-`` side by side along its input
  features (stacked along the batch for grouped convolutions).
* flat: ``R_x = 1^T (R / stab(1 1))``: the layer once more with unit weights on a unit input.

Nonlinearities (``Pass``) route the relevance arriving at their output to their input unchanged.
``tests/unit/explain/test_explainers.py`` proves every rule equal to Zennit's on every supported architecture and
to float64 matrix-form references.
"""

from __future__ import annotations

import torch
from torch import nn
from zennit.core import Hook, RemovableHandle, RemovableHandleList
from zennit.types import ConvolutionTranspose

__all__ = ["AlphaBeta", "Epsilon", "Flat", "Gamma", "Norm", "Pass", "Uniform", "ZPlus"]


def _stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps * sign(z)``, as Zennit's ``stabilize``, in two passes over ``z``.

    Zennit takes ``sign(0) = +1``; ``copysign`` gives ``-eps`` at ``z = -0.0``, which a sum of
    products only returns when every product is zero, so that unit passes no relevance either way.
    """
    return torch.copysign(torch.tensor(eps, dtype=z.dtype, device=z.device), z).add_(z)


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
    """Identity forward; backward divides by ``stab(z)`` (and multiplies by ``share``, if not 1)."""

    @staticmethod
    def forward(ctx, z, eps, share=1.0):
        ctx.save_for_backward(z)
        ctx.eps, ctx.share = eps, share
        return z.clone()  # a fresh tensor: in-place activations after the layer must not touch z

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        signal = grad / _stabilize(z, ctx.eps)
        return (signal if ctx.share == 1.0 else signal.mul_(ctx.share)), None, None


class _PassRelevance(torch.autograd.Function):
    """Forward: the module's own output ``box[0]``; backward: the signal goes to ``x`` unchanged.

    The output travels in a list, so autograd sees a new tensor (not a view of an input): no copy,
    and later in-place operations on it stay legal.
    """

    @staticmethod
    def forward(ctx, x, box):
        return box[0]

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SignSplit(torch.autograd.Function):
    """``x -> cat([x+, x-])`` along the batch; backward: ``R_x = x+ * g[:B] + x- * g[B:]``."""

    @staticmethod
    def forward(ctx, x):
        parts = torch.cat([x.clamp(min=0), x.clamp(max=0)])  # (2B, ...)
        ctx.save_for_backward(parts)
        return parts

    @staticmethod
    def backward(ctx, grad):
        (parts,) = ctx.saved_tensors
        products = parts * grad
        half = products.shape[0] // 2
        return products[:half] + products[half:]


class _SignSplitChannels(torch.autograd.Function):
    """``x -> cat([x+, x-])`` along the channels; backward: ``R_x = x+ * g[:, :C] + x- * g[:, C:]``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.cat([x.clamp(min=0), x.clamp(max=0)], dim=1)  # (B, 2C, ...)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        c = x.shape[1]
        # x+ and x- never overlap: x * (g+ where x > 0, g- elsewhere) is the sum of both products
        return torch.where(x > 0, grad[:, :c], grad[:, c:]).mul_(x)


class _AsOnes(torch.autograd.Function):
    """Forward: a tensor of ones shaped like ``x`` (the flat rule's input); backward: identity."""

    @staticmethod
    def forward(ctx, x):
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Redistribute(torch.autograd.Function):
    """Forward: the layer's own output ``box[0]``; backward: the signal of the rule's extra layer call.

    ``zz`` is the extra call's output, ``(N, G, K, O / G, ...)`` with G groups of the layer and K
    stacked weight parts. ``terms`` lists the rule's denominators as ``(slots, offset, scale)``:
    every slot of ``zz`` in ``slots`` receives ``R / (scale * sum(zz[slots]) + offset)``, which is
    ``coefficient * R / (z + bias + eps sign z)`` with ``scale = 1 / coefficient`` and ``offset =
    (bias + eps sign z) / coefficient``; the sign of each ``z`` is known in advance (``z+ >= 0``,
    ``z- <= 0``, the flat rule's ``z >= 0``), so the stabiliser is a constant. A term may end with
    a mask ``(B, G, O / G, ...)``: units outside it receive nothing (the gamma rule's ``z > 0`` and
    ``z < 0`` units). The rows of ``R`` (``B``, tokens of a linear layer included) are those of the
    masks and slots.
    """

    @staticmethod
    def forward(ctx, zz, box, terms):
        ctx.save_for_backward(zz)
        ctx.terms = terms
        return box[0]

    @staticmethod
    def backward(ctx, grad):
        (zz,) = ctx.saved_tensors
        grad = grad.reshape(-1, zz.shape[1], *zz.shape[3:])  # (B, G, O / G, ...)
        out = torch.empty_like(zz)
        for slots, offset, scale, *mask in ctx.terms:
            z = zz[slots[0]]
            for slot in slots[1:]:
                z = z + zz[slot]
            first = out[slots[0]]
            torch.add(offset, z, alpha=scale, out=first)  # the denominator, scale * z + offset, in place
            torch.div(grad, first, out=first)  # no temporary: large ones cost fresh pages on every call
            if mask:
                first.masked_fill_(~mask[0], 0.0)  # (a denominator near 0 outside the mask is never used)
            for slot in slots[1:]:
                out[slot].copy_(first)
        return out, None, None


class _Rule(Hook):
    """A Zennit-compatible hook (``copy``/``register``/``remove``) installed as forward hooks."""

    def copy(self) -> _Rule:
        clone = type(self).__new__(type(self))
        clone.__dict__.update({k: v for k, v in vars(self).items() if k not in ("stored_tensors", "tensor_handles")})
        Hook.__init__(clone)
        return clone

    def register(self, module: nn.Module) -> RemovableHandleList:
        return RemovableHandleList([
            RemovableHandle(self),
            module.register_forward_pre_hook(self.pre_forward),
            module.register_forward_hook(self.post_forward),
        ])

    def remove(self) -> None:
        self.stored_tensors.clear()


class _BypassRule(_Rule):
    """A rule that builds its own backward: the layer itself runs on a detached alias of its input."""

    def pre_forward(self, module, inputs):
        self.stored_tensors.setdefault("input", []).append(inputs[0])
        return (inputs[0].detach(), *inputs[1:])

    def post_forward(self, module, inputs, output):
        x = self.stored_tensors["input"].pop()
        if not x.requires_grad:
            return output
        return self.relevance(module, x, output.detach())

    def relevance(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Pass(_BypassRule):
    """Relevance at the output passes to the input unchanged (nonlinearities, paper Sec. 2)."""

    def relevance(self, module, x, y):
        return _PassRelevance.apply(x, [y])


class Epsilon(_Rule):
    """The epsilon rule, ``R_x = x * W^T (R / (z + eps sign z))``; Zennit's ``Epsilon``."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        super().__init__()
        self.epsilon = float(epsilon)

    def pre_forward(self, module, inputs):
        return (_TimesInput.apply(inputs[0]), *inputs[1:])

    def post_forward(self, module, inputs, output):
        return _DivideByStabilized.apply(output, self.epsilon)


class Norm(Epsilon):
    """Proportional redistribution for parameter-free linear maps (sums, average pools); Zennit's ``Norm``."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__(epsilon=stabilizer)


class Uniform(Epsilon):
    """The uniform rule on a product of two activations ``z = f(a, b)``, bilinear (AttnLRP eq. 7):
    ``R_a = 1/2 a * (dz/da)^T (R / stab z)`` and the same for ``b``; as ``a dz/da = b dz/db = z``
    summed, ``R_a + R_b = R``."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__(epsilon=stabilizer)

    def pre_forward(self, module, inputs):
        a, b, *rest = inputs
        return (_TimesInput.apply(a), _TimesInput.apply(b), *rest)

    def post_forward(self, module, inputs, output):
        return _DivideByStabilized.apply(output, self.epsilon, 0.5)  # half of R / stab(z) to each factor


def _weight_parts(module: nn.Module, parts: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Stack weight tensors along the outputs of ``module`` group by group: ``(G * K * O / G, ...)``."""
    if isinstance(module, ConvolutionTranspose):
        raise ValueError(
            f"The fast LRP engine has no alpha-beta / flat rule for {type(module).__name__}; "
            "use engine='zennit' for this model."
        )
    groups = getattr(module, "groups", 1)
    weight = parts[0]
    grouped = [p.reshape(groups, weight.shape[0] // groups, *weight.shape[1:]) for p in parts]
    stacked = torch.stack(grouped, dim=1).reshape(len(parts) * weight.shape[0], *weight.shape[1:])
    return _in_layout_of(module, stacked), groups


def _in_layout_of(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in the memory layout of ``module.weight`` (channels_last when the layer is)."""
    if weight.dim() == 4 and module.weight.is_contiguous(memory_format=torch.channels_last):
        return weight.contiguous(memory_format=torch.channels_last)
    return weight


def _call_with(module: nn.Module, weight: torch.Tensor, x: torch.Tensor, groups: int | None = None) -> torch.Tensor:
    """``module``'s own forward (no hooks) with ``weight``, no bias and optionally another group
    count, as Zennit's ``ParamMod`` does."""
    params = module._parameters
    saved = {key: params[key] for key in ("weight", "bias") if key in params}
    saved_groups = module.__dict__.get("groups")
    try:
        params["weight"] = nn.Parameter(weight, requires_grad=False)
        if "bias" in params:
            params["bias"] = None
        if groups is not None:
            module.__dict__["groups"] = groups
        return module.forward(x)
    finally:
        params.update(saved)
        if groups is not None:
            module.__dict__["groups"] = saved_groups


def _grouped(out: torch.Tensor, groups: int, parts: int) -> torch.Tensor:
    """``(N, G * K * O / G, ...) -> (N, G, K, O / G, ...)``."""
    return out.reshape(out.shape[0], groups, parts, -1, *out.shape[2:])


def _parts_call(module: nn.Module, parts: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The layer with each weight in ``parts`` applied to ``x``, in one call: ``(N, G, K, O / G, ...)``, G.

    A plain layer stacks the K parts along its outputs. A grouped convolution (groups > 1, e.g.
    depthwise) would then run with K outputs per group, which oneDNN computes 4-20x slower than
    K separate depthwise convolutions (forward and backward); so it gets the input repeated K times
    along the channels and K * G groups instead: every group keeps one output per input slice.
    """
    groups = getattr(module, "groups", 1)
    k = len(parts)
    if groups == 1 or k == 1 or isinstance(module, ConvolutionTranspose):
        stacked, groups = _weight_parts(module, parts)
        return _grouped(_call_with(module, stacked, x), groups, k), groups
    weight = _in_layout_of(module, torch.cat(parts))  # (K * O, C / G, ...): part-major, G groups each
    out = _call_with(module, weight, torch.cat([x] * k, dim=1), groups=k * groups)  # (N, K * O, ...)
    out = out.reshape(out.shape[0], k, groups, -1, *out.shape[2:])  # (N, K, G, O / G, ...)
    return out.transpose(1, 2), groups


def _offset(bias: torch.Tensor | None, eps: float, coefficient: float) -> torch.Tensor | float:
    """``(bias + eps) / coefficient``: the constant part of a scaled, stabilised denominator."""
    return (eps if bias is None else bias + eps) / coefficient


def _grouped_bias(b_pos, b_neg, groups: int, spatial: int) -> tuple:
    """The bias parts as ``(G, O / G, 1, ...)``, broadcasting against ``(B, G, O / G, ...)``; or Nones."""
    if b_pos is None:
        return None, None
    return tuple(b.reshape(groups, -1, *([1] * spatial)) for b in (b_pos, b_neg))


class AlphaBeta(_BypassRule):
    """The alpha-beta rule (Bach et al. 2015), Zennit's ``AlphaBeta`` (alpha - beta = 1)."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> None:
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be non-negative, got {alpha}, {beta}.")
        if alpha - beta != 1:
            raise ValueError(f"The alpha-beta rule needs alpha - beta = 1, got {alpha}, {beta}.")
        self.alpha, self.beta, self.stabilizer = float(alpha), float(beta), float(stabilizer)

    def relevance(self, module, x, y):
        weight = module.weight.detach()
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        b_pos = b_neg = None
        if getattr(module, "bias", None) is not None:
            bias = module.bias.detach()
            b_pos, b_neg = bias.clamp(min=0), bias.clamp(max=0)
        eps, alpha, beta = self.stabilizer, self.alpha, self.beta
        if not bool(x.amin() < 0):  # x >= 0 (after a rectifier): the x- terms vanish exactly
            # one call with [W+; W-] (or W+ alone for beta = 0) on x
            zz, groups = _parts_call(module, [w_pos, w_neg] if beta else [w_pos], _TimesInput.apply(x))
            plus, minus = [(slice(None), slice(None), 0)], [(slice(None), slice(None), 1)]
        elif beta and getattr(module, "groups", 1) == 1 and not isinstance(module, ConvolutionTranspose):
            # x+ and x- side by side along the channels, one call with [[W+, W-]; [W-, W+]] gives
            # z+ = W+ x+ + W- x- and z- = W- x+ + W+ x- as its two output halves directly (no sums of
            # batch halves, no copied signals)
            zz, groups = _parts_call(module, [torch.cat([w_pos, w_neg], dim=1), torch.cat([w_neg, w_pos], dim=1)],
                                     _SignSplitChannels.apply(x))
            plus, minus = [(slice(None), slice(None), 0)], [(slice(None), slice(None), 1)]
        else:
            # x+ and x- stacked along the batch; z+ = W+ x+ + W- x-, z- = W- x+ + W+ x-
            half = x.shape[0]
            top, bottom = slice(None, half), slice(half, None)
            split = _SignSplit.apply(x)  # (2B, ...)
            if beta:
                zz, groups = _parts_call(module, [w_pos, w_neg], split)
                plus = [(top, slice(None), 0), (bottom, slice(None), 1)]
                minus = [(top, slice(None), 1), (bottom, slice(None), 0)]
            else:  # z+ only: W+ on x+ and W- on x-, two calls
                stacked_pos, groups = _weight_parts(module, [w_pos])
                stacked_neg, _ = _weight_parts(module, [w_neg])
                zz = torch.cat([_call_with(module, stacked_pos, split[top]),
                                _call_with(module, stacked_neg, split[bottom])])
                zz = _grouped(zz, groups, 1)
                plus = [(top, slice(None), 0), (bottom, slice(None), 0)]
        # z+ >= 0 and z- <= 0 by construction: stab(z+) = z+ + eps, stab(z-) = z- - eps (Zennit takes
        # +eps at z- = 0, a unit without negative contributions or bias: it passes no relevance either way)
        b_pos, b_neg = _grouped_bias(b_pos, b_neg, groups, zz.dim() - 4)
        terms = [(plus, _offset(b_pos, eps, alpha), 1 / alpha)]
        if beta:
            terms.append((minus, _offset(b_neg, -eps, -beta), -1 / beta))
        return _Redistribute.apply(zz, [y], terms)


class ZPlus(AlphaBeta):
    """The z+ rule, alpha-beta with alpha = 1, beta = 0 (Zennit's ``ZPlus``)."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__(alpha=1.0, beta=0.0, stabilizer=stabilizer)


class Gamma(_BypassRule):
    """The generalised gamma rule (Montavon et al. 2019; Andéol et al. 2021), Zennit's ``Gamma``: the
    positive contributions to a positive output (the negative ones to a negative output) weighted
    ``1 + gamma``, the others 1; ``stabilizer`` is the eps of the denominators. Linear layers of any
    input rank (transformer tokens) and convolutions of any groups."""

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        super().__init__()
        if not gamma >= 0:
            raise ValueError(f"gamma={gamma} is invalid: the gamma rule needs gamma >= 0")
        self.gamma, self.stabilizer = float(gamma), float(stabilizer)

    def relevance(self, module, x, y):
        g, eps = self.gamma, self.stabilizer
        if isinstance(module, nn.Linear) and x.dim() != 2:  # (..., D) tokens: rows of a 2-D layer
            x = x.reshape(-1, x.shape[-1])
        weight = module.weight.detach()
        up, down = weight + g * weight.clamp(min=0), weight + g * weight.clamp(max=0)  # W + g W+, W + g W-
        if getattr(module, "groups", 1) == 1 and not isinstance(module, ConvolutionTranspose):
            # x+ and x- side by side along the input features: [[W^, Wv]; [Wv, W^]] gives zu and zd directly
            zz, groups = _parts_call(module, [torch.cat([up, down], dim=1), torch.cat([down, up], dim=1)],
                                     _SignSplitChannels.apply(x))
            rise, fall = [(slice(None), slice(None), 0)], [(slice(None), slice(None), 1)]
        else:  # x+ and x- stacked along the batch: zu = W^ x+ + Wv x-, zd = Wv x+ + W^ x-
            top, bottom = slice(None, x.shape[0]), slice(x.shape[0], None)
            zz, groups = _parts_call(module, [up, down], _SignSplit.apply(x))
            rise = [(top, slice(None), 0), (bottom, slice(None), 1)]
            fall = [(top, slice(None), 1), (bottom, slice(None), 0)]
        b_up = b_down = None
        if getattr(module, "bias", None) is not None:
            bias = module.bias.detach()
            b_up, b_down = bias + g * bias.clamp(min=0), bias + g * bias.clamp(max=0)
        b_up, b_down = _grouped_bias(b_up, b_down, groups, zz.dim() - 4)
        z = y.reshape(-1, groups, *zz.shape[3:])  # the layer's own output decides the unit's side
        # zu >= z > 0 and zd <= z < 0 where they are used: stab(zu) = zu + eps, stab(zd) = zd - eps
        terms = [(rise, _offset(b_up, eps, 1.0), 1.0, z > 0), (fall, _offset(b_down, -eps, 1.0), 1.0, z < 0)]
        return _Redistribute.apply(zz, [y], terms)


class Flat(_BypassRule):
    """The flat rule (Lapuschkin et al. 2019): unit weights, unit input, no bias; Zennit's ``Flat``."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__()
        self.stabilizer = float(stabilizer)

    def relevance(self, module, x, y):
        ones, groups = _weight_parts(module, [torch.ones_like(module.weight.detach())])
        unit = _AsOnes.apply(x)
        zz = _grouped(_call_with(module, ones, unit), groups, 1)
        # z counts the unit weights inside the receptive field: z > 0, stab(z) = z + eps
        return _Redistribute.apply(zz, [y], [([(slice(None), slice(None), 0)], self.stabilizer, 1.0)])
