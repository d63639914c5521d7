"""The named explainers: each name is a class and its parameters, the catalogue in Python.

``EXPLAINERS["lrp_epsilon_0.01"]`` is ``functools.partial(LRP, composite="epsilon", epsilon=0.01,
pooling="sum")``: calling it builds the explainer, keyword arguments override its parameters
(``EXPLAINERS["sensitivity_l2"](pooling="linf")``). :func:`heatmapbench.explain.get_explainer`
looks names up here (after the user's own, see :mod:`heatmapbench.registry`); nothing is read from
disk. The YAML files ``conf/explainer/<name>.yaml`` are the commands' face of the same entries
(``explainer=<name>``, ``evaluation.explainers=[...]``); a test keeps each equal to its entry here.

A preset states every parameter that defines its method (the paper's ε, the channel pooling), also
where it equals the class's default: a change of a class default must not change a named method.
"""

from __future__ import annotations

from functools import partial

from .captum_adapter import CaptumExplainer
from .gradient import DeconvNet, GradientXInput, GuidedBackprop, Sensitivity
from .lrp import LRP
from .noise import RandomExplainer

__all__ = ["EXPLAINERS"]

#: name -> the explainer's class with its parameters bound (``EXPLAINERS[name]()`` builds it).
EXPLAINERS: dict[str, partial] = {
    # Paper Sec. 3: the random ordering baseline (seeded uniform noise, independent of the model).
    "random": partial(RandomExplainer, seed=0),
    # Paper eq. 3 with q = 2: l2 norm of df/dx over colour channels; q = inf: max |df/dx|.
    "sensitivity_l2": partial(Sensitivity, pooling="l2"),
    "sensitivity_linf": partial(Sensitivity, pooling="linf"),
    # Zeiler & Fergus deconvolution, channels pooled like sensitivity.
    "deconvnet_l2": partial(DeconvNet, pooling="l2"),
    "deconvnet_linf": partial(DeconvNet, pooling="linf"),
    # Springenberg et al. 2015; channels pooled with the l2 norm like sensitivity.
    "guided_backprop": partial(GuidedBackprop, pooling="l2"),
    "gradient_x_input": partial(GradientXInput, pooling="sum"),
    # Paper Sec. 2: eps-LRP with eps = 0.01 and eps = 100, relevance summed over colour channels.
    "lrp_epsilon_0.01": partial(LRP, composite="epsilon", epsilon=0.01, pooling="sum"),
    "lrp_epsilon_100": partial(LRP, composite="epsilon", epsilon=100.0, pooling="sum"),
    # Paper Sec. 2: alpha-beta LRP with alpha = 2, beta = 1 (written beta = -1 in the paper).
    "lrp_alpha2_beta1": partial(LRP, composite="alpha_beta", alpha=2.0, beta=1.0, pooling="sum"),
    # alpha = 1, beta = 0: the z+ rule on every layer.
    "lrp_alpha1_beta0": partial(LRP, composite="alpha_beta", alpha=1.0, beta=0.0, pooling="sum"),
    # Modern composite (Kohlbrenner et al. 2020): flat first layer, z+ convolutions, eps dense layers.
    "lrp_epsilon_plus_flat": partial(LRP, composite="epsilon_plus_flat", epsilon=1e-6, pooling="sum"),
    # CP-LRP (Ali et al. 2022), as LXT 2.1 explains vision transformers: attention weights and other
    # sigmoid/softmax-type factors held constant, LayerNorm at constant std, GELU/SiLU by the identity
    # rule, eps-rule on conv/linear layers.
    "cp_lrp": partial(LRP, composite="epsilon", epsilon=0.01, gamma=0.0, gates="constant", pooling="sum"),
    # AttnLRP (Achtibat et al. 2024): uniform rule on the q.k and attention.v products (and on any
    # other product of two activations), the softmax rule, otherwise as cp_lrp.
    "attnlrp": partial(LRP, composite="epsilon", epsilon=0.01, gamma=0.0, gates="uniform", pooling="sum"),
    # Any Captum attribution class (default: Captum's Saliency); override method.
    "captum": partial(CaptumExplainer, method="captum.attr.Saliency", attribute_kwargs={}, pooling="l2"),
    # Sundararajan et al. 2017 via Captum; baseline 0 in model space, n_steps Gauss-Legendre points.
    "integrated_gradients": partial(CaptumExplainer, method="captum.attr.IntegratedGradients",
                                    attribute_kwargs={"n_steps": 32, "baselines": 0.0}, pooling="sum"),
    # Smilkov et al. 2017 via Captum: mean gradient over noisy copies, l2 over colour channels.
    "smoothgrad": partial(CaptumExplainer, method="captum.attr.Saliency", attribute_kwargs={"abs": False},
                          noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 16, "stdevs": 0.15}, seed=0,
                          pooling="l2"),
}
