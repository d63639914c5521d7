"""Layer-wise relevance propagation (Bach et al. 2015; paper Sec. 2) through Zennit rules.

Relevance starts at the pre-softmax target score ``f(x)`` and is propagated layer by layer;
relevance passes unchanged through nonlinearities, and the pixel score is the sum over colour
channels. The rules per layer type are tables (:data:`RULE_TABLES`); they are applied to the
model's traced and rewritten graph (:func:`.graph.canonize`), in which BatchNorm is folded into the
layer that feeds it and every functional add, mean and activation is an explicit module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import nn
from zennit.canonizers import Canonizer
from zennit.composites import LayerMapComposite
from zennit.core import Hook
from zennit.layer import Sum
from zennit import rules as zennit_rules
from zennit.types import Activation, AvgPool, BatchNorm, Convolution, Linear, MaxPool

from . import fast_lrp
from .base import Explainer, backprop
from .canonize import GATES, BatchNormAffine, ConstantFactorProduct, NormStdConstant, UniformProduct, canonize

try:
    from efficientnet_lite_pytorch.utils import Identity as _EfficientNetIdentity
except ImportError:  # pragma: no cover
    _EfficientNetIdentity = nn.Identity

LayerMap = list[tuple[tuple[type, ...] | type, Hook]]

#: Leaf modules that need no rule: they move or select values without mixing them, so the
#: plain gradient redistributes relevance correctly (max pooling: winner takes all).
PASS_THROUGH = (
    nn.Identity,
    _EfficientNetIdentity,
    nn.Flatten,
    nn.Unflatten,
    nn.modules.dropout._DropoutNd,
    nn.modules.padding._ConstantPadNd,
    MaxPool,
    nn.Upsample,  # nearest (the canonized graph replaces the (bi)linear ones by a proportional Reduce)
)


#: Where the rule classes come from, per engine: Zennit's hooks, or the same rules as single autograd
#: functions (:mod:`.fast_lrp`, proven equal to Zennit in the tests). Both have the same names.
ENGINES: dict[str, ModuleType] = {"fast": fast_lrp, "zennit": zennit_rules}


def _base_map(r: ModuleType, stabilizer: float) -> LayerMap:
    """Rules shared by every table: relevance passes through nonlinearities (paper Sec. 2) and
    (folded, identity) BatchNorm; sums and average pools redistribute in proportion to inputs.

    The modules of transformers and gated nets get the rules of LXT's efficient AttnLRP / CP-LRP
    (Achtibat et al. 2024) in both engines (Zennit has no rules for two-input modules): the z-rule
    (``Norm``, eps = stabilizer) on a norm at constant std, on a product whose other factor is held
    constant, and on a softmax (AttnLRP's softmax rule); the uniform rule on a product of two
    activations."""
    return [
        (NormStdConstant, fast_lrp.Norm(stabilizer=stabilizer)),
        (ConstantFactorProduct, fast_lrp.Norm(stabilizer=stabilizer)),
        (UniformProduct, fast_lrp.Uniform(stabilizer=stabilizer)),
        (nn.Softmax, fast_lrp.Norm(stabilizer=stabilizer)),
        (Activation, r.Pass()),
        (BatchNorm, r.Pass()),
        (Sum, r.Norm(stabilizer=stabilizer)),
        (AvgPool, r.Norm(stabilizer=stabilizer)),
    ]


def _epsilon(r: ModuleType, p: dict[str, Any]) -> tuple[LayerMap, LayerMap]:
    # R_i = sum_j z_ij / (z_j + eps * sign(z_j)) R_j  (paper, eps-rule); a BatchNorm that no layer
    # feeds is an elementwise affine layer y = s x + t with the same rule. gamma > 0: the generalised
    # gamma rule on linear and convolution layers, with eps in its denominators (Montavon et al. 2019)
    linear = r.Gamma(gamma=p["gamma"], stabilizer=p["epsilon"]) if p["gamma"] else r.Epsilon(epsilon=p["epsilon"])
    return [(BatchNormAffine, r.Epsilon(epsilon=p["epsilon"])), (Linear, linear)], []


def _alpha_beta(r: ModuleType, p: dict[str, Any]) -> tuple[LayerMap, LayerMap]:
    # R_i = sum_j (alpha z+_ij / z+_j - beta z-_ij / z-_j) R_j, alpha - beta = 1 (paper: alpha=2, beta=1);
    # an unfolded BatchNorm (elementwise) keeps the eps-rule with eps = stabilizer
    return [
        (BatchNormAffine, r.Epsilon(epsilon=p["stabilizer"])),
        (Linear, r.AlphaBeta(alpha=p["alpha"], beta=p["beta"], stabilizer=p["stabilizer"])),
    ], []


def _epsilon_plus_flat(r: ModuleType, p: dict[str, Any]) -> tuple[LayerMap, LayerMap]:
    # Kohlbrenner et al. 2020: flat rule for the first layer, z+ for convolutions, eps for dense layers
    # (and for an unfolded BatchNorm, elementwise)
    return (
        [(BatchNormAffine, r.Epsilon(epsilon=p["epsilon"])), (Convolution, r.ZPlus(stabilizer=p["stabilizer"])),
         (nn.Linear, r.Epsilon(epsilon=p["epsilon"]))],
        [(Linear, r.Flat(stabilizer=p["stabilizer"]))],
    )


#: composite name -> function(rule classes, params) -> (layer map, first-layer map)
RULE_TABLES: dict[str, Callable[[ModuleType, dict[str, Any]], tuple[LayerMap, LayerMap]]] = {
    "epsilon": _epsilon,
    "alpha_beta": _alpha_beta,
    "epsilon_plus_flat": _epsilon_plus_flat,
}


class RuleComposite(LayerMapComposite):
    """Zennit layer-map composite that finds the first linear layer in registration order (also
    when it is not a leaf module) and refuses models with a leaf layer that has no rule."""

    def __init__(self, layer_map: LayerMap, first_map: LayerMap, canonizers: Sequence[Canonizer] = ()):
        super().__init__(layer_map=layer_map, canonizers=list(canonizers))
        self.first_map = first_map
        self.module_map = self._map

    def _lookup(self, ctx: dict, module: nn.Module) -> Hook | None:
        if isinstance(module, Linear) and not ctx.get("first_seen"):
            ctx["first_seen"] = True
            hook = next((h for types, h in self.first_map if isinstance(module, types)), None)
            if hook is not None:
                return hook
        return next((h for types, h in self.layer_map if isinstance(module, types)), None)

    def _map(self, ctx: dict, name: str, module: nn.Module) -> Hook | None:
        hook = self._lookup(ctx, module)
        if hook is None and not any(True for _ in module.children()) and not isinstance(module, PASS_THROUGH):
            ctx.setdefault("missing", []).append((name, module))
        return hook

    def register(self, module: nn.Module) -> None:
        self.remove()
        for canonizer in self.canonizers:
            self.handles += canonizer.apply(module)
        ctx: dict = {}
        for name, child in module.named_modules():
            template = self.module_map(ctx, name, child)
            if template is not None:
                hook = template.copy()
                self.hook_refs.add(hook)
                self.handles.append(hook.register(child))
        if ctx.get("missing"):
            self.remove()  # undo canonizers and hooks before reporting
            layers = ", ".join(f"{name!r} ({type(m).__name__})" for name, m in ctx["missing"])
            raise ValueError(
                f"LRP has no rule for layer {layers}. Add a (type, rule) pair to the rule table, "
                "or replace the layer by a supported one (Linear, Conv, pooling, activations, BatchNorm)."
            )


class LRP(Explainer):
    """Layer-wise relevance propagation with a named rule table.

    Parameters
    ----------
    composite
        ``"epsilon"`` (paper: eps = 0.01 and eps = 100), ``"alpha_beta"`` (paper: alpha=2, beta=1),
        or ``"epsilon_plus_flat"`` (a modern composite); see :data:`RULE_TABLES`.
    epsilon
        The eps of the eps-rule, ``z_j + eps * sign(z_j)`` in the denominator.
    gamma
        ``"epsilon"`` only: 0 (default) keeps the eps-rule on linear and convolution layers; > 0 gives
        them the generalised gamma rule (Montavon et al. 2019, Zennit's ``Gamma``): contributions of
        the output's sign weighted ``1 + gamma``, with ``epsilon`` in the denominators. It favours
        positive evidence and makes heatmaps less noisy in deep stacks (ViTs: ``cp_lrp``, ``attnlrp``).
    alpha, beta
        Weights of the positive and negative contributions in the alpha-beta rule.
    stabilizer
        Small constant keeping the denominators of the other rules away from 0.
    canonize
        Explain the model's traced, rewritten graph (:func:`.graph.canonize`: BatchNorm folded into
        the layer that feeds it, every functional add / mean / activation given its rule, operations
        without a sound rule refused). Turning it off hooks the registered modules only, which gives
        wrong relevance on BatchNorm, residual and functional-style networks.
    gates
        ``"refuse"`` (default): a product of two activations (squeeze-excitation, gating, attention)
        is refused. ``"constant"``: its sigmoid-type factor (a gate, attention weights) is held
        constant and relevance passes to the other factor (CP-LRP, Ali et al. 2022; LXT's CP-LRP
        for vision transformers). ``"uniform"``: each product of two activations gives half the
        relevance to each factor and a softmax gets AttnLRP's rule (AttnLRP, Achtibat et al. 2024).
    engine
        ``"fast"`` runs every table in one forward + one backward pass (:mod:`.fast_lrp`, proven
        equal to Zennit in the tests); ``"zennit"`` uses Zennit's hooks.
    pooling
        Channel pooling; the paper sums relevance over colour channels.
    """

    name = "lrp"

    def __init__(
        self,
        composite: str = "epsilon",
        epsilon: float = 1e-6,
        alpha: float = 2.0,
        beta: float = 1.0,
        stabilizer: float = 1e-6,
        canonize: bool = True,
        engine: str = "fast",
        pooling: str = "sum",
        gates: str = "refuse",
        gamma: float = 0.0,
    ) -> None:
        super().__init__(pooling=pooling)
        if composite not in RULE_TABLES:
            raise ValueError(f"Unknown LRP composite {composite!r}; choose one of {', '.join(RULE_TABLES)}.")
        if not epsilon >= 0:
            raise ValueError(f"epsilon={epsilon} is invalid: the epsilon rule needs epsilon >= 0")
        if not stabilizer > 0:
            raise ValueError(f"stabilizer={stabilizer} is invalid: it must be > 0 (it keeps denominators off zero)")
        if not gamma >= 0:
            raise ValueError(f"gamma={gamma} is invalid: the gamma rule needs gamma >= 0 (0: the epsilon rule)")
        if gamma and composite != "epsilon":
            raise ValueError(f"gamma={gamma} is invalid with composite={composite!r}: the gamma rule replaces the "
                             "epsilon rule of composite 'epsilon' (cp_lrp, attnlrp, lrp_epsilon_*)")
        if alpha - beta != 1:
            raise ValueError(f"The alpha-beta rule needs alpha - beta = 1 to conserve relevance, got {alpha}, {beta}.")
        self.composite = composite
        self.epsilon = float(epsilon)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.stabilizer = float(stabilizer)
        self.gamma = float(gamma)
        self.canonize = canonize
        if engine not in ENGINES:
            raise ValueError(f"Unknown LRP engine {engine!r}; choose one of {', '.join(ENGINES)}.")
        self.engine = engine
        if gates not in GATES:
            raise ValueError(f"Unknown gates rule {gates!r}; choose one of {', '.join(GATES)}.")
        self.gates = gates

    def make_composite(self) -> RuleComposite:
        """A fresh Zennit composite for one call (composites hold per-model state)."""
        params = {"epsilon": self.epsilon, "alpha": self.alpha, "beta": self.beta, "stabilizer": self.stabilizer,
                  "gamma": self.gamma}
        rules = ENGINES[self.engine]
        layer_map, first_map = RULE_TABLES[self.composite](rules, params)
        return RuleComposite(layer_map + _base_map(rules, self.stabilizer), first_map)

    def network(self, model: nn.Module, x: torch.Tensor | None = None) -> nn.Module:
        """What the rules are applied to: the canonized graph (cached per model), or ``model`` itself.

        ``x`` (the batch to explain) lets models with control flow on shapes be traced for its shape."""
        if not self.canonize:
            return model
        graph = canonize(model, purpose="lrp", gates=self.gates, example=x)
        graph.check_lrp()
        return graph

    def attribute(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        net = self.network(model, x)
        with self.make_composite().context(net):
            return backprop(net, x, target, seed_with_score=True)  # (B, C, H, W) relevance
