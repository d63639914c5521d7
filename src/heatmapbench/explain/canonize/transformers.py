"""Graph rewrites and modules for transformers and gated nets: normalisation, attention, products.

Used by :mod:`.rewriter` (imports nothing of the package); each rewrite keeps the forward value of the model
(bit-identical for normalisation, equal to rounding where attention is recomputed in parts) and
turns an operation into a module whose LRP rule the rule tables choose:

===========================================  ===================================================
operation                                    module (rule)
===========================================  ===================================================
``nn.LayerNorm``, ``F.layer_norm``,          :class:`NormStdConstant`: the exact value; its
``nn.RMSNorm``, ``F.rms_norm``               gradient holds the standard deviation constant, so
                                             the z-rule sees the linear map ``(x - mean) / std``
                                             (the identity rule on the normalisation, LXT's
                                             ``layer_norm_forward``; Achtibat et al. 2024)
``F.scaled_dot_product_attention``           expanded into ``q @ k^T * scale (+ mask)``,
                                             ``softmax``, ``@ v`` (:func:`expand_attention`)
``nn.MultiheadAttention`` (self- or cross-,  expanded: an in-projection ``nn.Linear`` sharing the
no masks)                                    module's parameters, heads, the attention above,
                                             the module's own ``out_proj``
``w @ v`` with ``w`` from a softmax, gates   :class:`ConstantFactorProduct`: the softmax factor held
held constant (CP-LRP)                       constant (Ali et al. 2022), z-rule on the other
a product of two activations, uniform rule   :class:`UniformProduct`: half the relevance to each
(AttnLRP)                                    factor, each by the z-rule (AttnLRP eq. 7)
``softmax``                                  ``nn.Softmax``: AttnLRP's rule
                                             ``R_x = x (R - s sum R)`` is the z-rule on it
===========================================  ===================================================
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "ConstantFactorProduct",
    "NormStdConstant",
    "Softmax",
    "UniformProduct",
    "attention_scale",
    "expand_attention",
]


# --------------------------------------------------------------------------------------------
# normalisation with the standard deviation held constant


class _StdConstant(torch.autograd.Function):
    """Forward: the exact ``F.layer_norm`` / ``F.rms_norm``; backward: its Jacobian at constant std.

    Layer norm ``y = (x - mean) / std * w + b`` gives ``g_x = (w g - mean(w g)) / std``; RMS norm
    ``y = x / rms * w`` gives ``g_x = w g / rms`` (means over the normalised dims).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps, rms):
        ctx.save_for_backward(x, weight)
        ctx.shape, ctx.eps, ctx.rms = shape, eps, rms
        if rms:
            return F.rms_norm(x, shape, weight, eps)
        return F.layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dims = tuple(range(-len(ctx.shape), 0))
        g = grad * weight if weight is not None else grad
        if ctx.rms:
            eps = torch.finfo(x.dtype).eps if ctx.eps is None else ctx.eps
            return g / (x.square().mean(dims, keepdim=True) + eps).sqrt(), None, None, None, None, None
        std = (x.var(dims, unbiased=False, keepdim=True) + ctx.eps).sqrt()
        return (g - g.mean(dims, keepdim=True)) / std, None, None, None, None, None


class NormStdConstant(nn.Module):
    """A layer / RMS norm whose rule sees the linear map at constant standard deviation.

    ``weight`` and ``bias`` are the user's tensors, held by reference (not registered), read at call
    time. The z-rule on it, ``R_x = x * J^T (R / y)``, conserves relevance when ``bias`` is zero.
    """

    def __init__(self, shape: tuple[int, ...], eps: float | None, weight: torch.Tensor | None,
                 bias: torch.Tensor | None, rms: bool, label: str = "") -> None:
        super().__init__()
        self.shape, self.eps, self.rms, self.label = tuple(shape), eps, rms, label
        self._tensors = (weight, bias)  # a tuple: not registered, so always the user's current tensors

    @classmethod
    def from_module(cls, module: nn.Module) -> NormStdConstant:
        rms = isinstance(module, nn.RMSNorm)
        norm = cls(module.normalized_shape, module.eps, module.weight, getattr(module, "bias", None), rms,
                   label=repr(module))
        norm._source = (module,)  # parameters re-read from the module (they may be replaced)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source = getattr(self, "_source", None)
        weight, bias = (source[0].weight, getattr(source[0], "bias", None)) if source else self._tensors
        return _StdConstant.apply(x, weight, bias, self.shape, self.eps, self.rms)

    def extra_repr(self) -> str:
        return self.label or f"{'rms' if self.rms else 'layer'} norm over {self.shape}"


class BatchNormCall(nn.Module):
    """``F.batch_norm`` in eval mode as called inside a module's forward (timm's BatchNormAct2d), with
    the user's statistics and affine tensors held by reference; wrapped in a ``BatchNormAffine``."""

    def __init__(self, running_mean, running_var, weight, bias, eps: float) -> None:
        super().__init__()
        self._tensors = (running_mean, running_var, weight, bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var, weight, bias = self._tensors
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)


# --------------------------------------------------------------------------------------------
# products of two activations


class ConstantFactorProduct(nn.Module):
    """``fn(signal, factor)`` (or ``fn(factor, signal)``) with ``factor`` held constant.

    A linear map of ``signal`` with weights from the held factor (attention weights, a gate): its
    rule is the z-rule on ``signal``; no relevance reaches the factor (CP-LRP, Ali et al. 2022).
    """

    def __init__(self, fn: Any, factor_first: bool, label: str = "") -> None:
        super().__init__()
        self.fn, self.factor_first, self.label = fn, factor_first, label

    def forward(self, signal: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        factor = factor.detach()
        return self.fn(factor, signal) if self.factor_first else self.fn(signal, factor)

    def extra_repr(self) -> str:
        return f"{self.label}, {'first' if self.factor_first else 'second'} factor constant"


class UniformProduct(nn.Module):
    """``fn(a, b)`` bilinear in two activations; its rule gives each factor half the relevance
    by the z-rule of the product as a linear map of that factor (AttnLRP's uniform rule)."""

    def __init__(self, fn: Any, label: str = "") -> None:
        super().__init__()
        self.fn, self.label = fn, label

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fn(a, b)

    def extra_repr(self) -> str:
        return self.label


class Softmax(nn.Softmax):
    """``nn.Softmax`` that also takes the ``dtype`` of ``F.softmax`` (Hugging Face computes it in float32)."""

    def __init__(self, dim: int | None = None, dtype: torch.dtype | None = None, _stacklevel: int = 3) -> None:
        super().__init__(dim)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(x, self.dim, dtype=self.dtype)


# --------------------------------------------------------------------------------------------
# attention expanded into products and a softmax


def attention_scale(q: torch.Tensor, scale: float | None) -> float:
    """The scale of ``F.scaled_dot_product_attention``: ``scale`` or ``1 / sqrt(q.size(-1))``."""
    return 1.0 / math.sqrt(q.size(-1)) if scale is None else scale


_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MHA_PARAMS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
               "is_causal")


def _bound(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _sdpa_nodes(graph: fx.Graph, q: Any, k: Any, v: Any, mask: Any, scale: Any) -> fx.Node:
    """``softmax(q @ k^T * scale + mask) @ v`` as graph nodes, inserted at the current point."""
    keys = graph.call_method("transpose", (k, -2, -1))
    scores = graph.call_function(operator.matmul, (q, keys))
    factor = graph.call_function(attention_scale, (q, scale))
    scores = graph.call_function(operator.mul, (scores, factor))
    if mask is not None:
        scores = graph.call_function(operator.add, (scores, mask))
    weights = graph.call_method("softmax", (scores, -1))
    return graph.call_function(operator.matmul, (weights, v))


def expand_attention(gm: fx.GraphModule, modules: dict[str, nn.Module], add_module: Any,
                     refuse: Any) -> None:
    """Replace fused attention (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``) in
    ``gm``'s graph by explicit nodes the canonizer gives rules to; ``refuse(node, why)`` otherwise."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            p = _bound(node, _SDPA_PARAMS)
            if p.get("dropout_p", 0.0) not in (0, 0.0) or p.get("is_causal", False) or p.get("enable_gqa", False):
                refuse(node, "scaled_dot_product_attention with dropout, is_causal or enable_gqa has no rule here")
                continue
            mask = p.get("attn_mask")
            if isinstance(mask, fx.Node):
                refuse(node, "scaled_dot_product_attention with a mask has no rule here (boolean masks "
                             "would need masked_fill)")
                continue
            with graph.inserting_before(node):
                out = _sdpa_nodes(graph, p["query"], p["key"], p["value"], None, p.get("scale"))
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        elif node.op == "call_module" and isinstance(modules.get(node.target), nn.MultiheadAttention):
            _expand_mha(graph, node, modules[node.target], add_module, refuse)


def _expand_mha(graph: fx.Graph, node: fx.Node, mha: nn.MultiheadAttention, add_module: Any, refuse: Any) -> None:
    p = _bound(node, _MHA_PARAMS)
    if any(p.get(name) is not None for name in ("key_padding_mask", "attn_mask")) or p.get("is_causal"):
        refuse(node, "nn.MultiheadAttention with masks has no rule here")
        return
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        refuse(node, "nn.MultiheadAttention with kdim/vdim, add_bias_kv or add_zero_attn has no rule here")
        return
    users = list(node.users)
    if any(u.target is not operator.getitem for u in users) or any(
            u.args[1] != 0 and u.users for u in users):
        refuse(node, "the attention weights of nn.MultiheadAttention are used; LRP explains its output only")
        return
    embed, heads = mha.embed_dim, mha.num_heads
    inputs = [p["query"], p["key"], p["value"]]
    with graph.inserting_before(node):
        if not mha.batch_first:
            inputs = [graph.call_method("transpose", (t, 0, 1)) for t in inputs]  # (B, N, E)
        if p["query"] is p["key"] is p["value"]:
            proj = graph.call_module(add_module(str(node.target), _in_projection(mha)), (inputs[0],))
            parts = [graph.call_function(operator.getitem, (graph.call_method("chunk", (proj, 3, -1)), i))
                     for i in range(3)]
        else:
            parts = []
            for i, t in enumerate(inputs):
                proj = graph.call_module(add_module(str(node.target), _in_projection(mha)), (t,))
                parts.append(graph.call_function(operator.getitem, (graph.call_method("chunk", (proj, 3, -1)), i)))
        q, k, v = [graph.call_method("transpose", (graph.call_method("unflatten", (t, -1, (heads, embed // heads))),
                                                     1, 2)) for t in parts]  # (B, H, N, D)
        out = _sdpa_nodes(graph, q, k, v, None, None)
        out = graph.call_method("flatten", (graph.call_method("transpose", (out, 1, 2)), -2))  # (B, N, E)
        out = graph.call_module(f"{node.target}.out_proj", (out,))
        if not mha.batch_first:
            out = graph.call_method("transpose", (out, 0, 1))
    for user in users:
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)


def _in_projection(mha: nn.MultiheadAttention) -> nn.Linear:
    """An ``nn.Linear`` holding ``mha``'s own in-projection Parameters (the same objects)."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.in_features, linear.out_features = mha.embed_dim, 3 * mha.embed_dim
    linear._parameters["weight"] = mha.in_proj_weight
    linear._parameters["bias"] = mha.in_proj_bias
    linear.training = False
    return linear
