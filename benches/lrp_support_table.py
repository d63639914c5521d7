"""Which architectures LRP (and deconvnet / guided backprop) explains exactly, with a rule, or refuses.

Usage: ``python benches/lrp_support_table.py [--out table.md] [--archs ...]``. Random-weight
networks (torchvision, the zoo, timm) in float64 with randomised BatchNorm statistics, one 64x64
image. For each architecture and method it runs the explainer and prints a Markdown table cell:

* ``exact (max rel err e)``: LRP-eps with eps -> 0 (plain, ``cp_lrp``, ``attnlrp``) against gradient
  x input (an identity on ReLU nets);
* ``supported (conservation err e) ...; rules: ...``: where it is not that identity, the relative
  gap between the input relevance and the target score on a bias-free copy (biases, norm shifts,
  class tokens, position embeddings zeroed; ``cp_lrp`` conserves, AttnLRP's softmax rule does not
  by construction), and the rules the graph rewrite chose beyond exact ones;
* ``conserves (rel err e)`` (err <= 1e-6) or ``DOES NOT conserve``: alpha-beta / eps+flat on a
  bias-free copy, sum of relevance vs score;
* deconvnet / guided backprop: ``supported`` or refused;
* ``refused (...)``: the first line of the error.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torchvision
from torch import nn

from heatmapbench.explain import LRP, get_explainer
from heatmapbench.explain.base import explaining
from heatmapbench.explain.canonize import canonize
from heatmapbench.testing import bias_free, randomize_batch_norm

torch.set_num_threads(2)


def efficientnet_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0")


ARCHS = {
    "vgg11_bn": lambda: torchvision.models.vgg11_bn(num_classes=10),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "googlenet": lambda: torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True),
    "squeezenet1_1": lambda: torchvision.models.squeezenet1_1(num_classes=10),
    "efficientnet_lite0 (zoo)": efficientnet_lite0,
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),
    "vit_b_16 (torchvision, 64 px)": lambda: _head_randomised(torchvision.models.vit_b_16(num_classes=10,
                                                                                          image_size=64)),
}


def _head_randomised(model: nn.Module) -> nn.Module:
    """torchvision zero-initialises the ViT head (every score 0): give it random weights."""
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.1)
    return model


def _timm(name: str, **kwargs):
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    return build


TIMM = {  # the timm families users bring (timm 1.0.x), 64 px inputs
    "vit_tiny_patch16_224 (timm)": _timm("vit_tiny_patch16_224", img_size=64),
    "deit_tiny_patch16_224 (timm)": _timm("deit_tiny_patch16_224", img_size=64),
    "swin_tiny_patch4_window7_224 (timm, window 4)": _timm("swin_tiny_patch4_window7_224", img_size=64,
                                                           window_size=4),
    "convnext_atto (timm)": _timm("convnext_atto"),
    "efficientnet_b0 (timm)": _timm("efficientnet_b0"),
    "seresnet18 (timm)": _timm("seresnet18"),
    "regnety_002 (timm)": _timm("regnety_002"),
    "hrnet_w18_small (timm)": _timm("hrnet_w18_small"),
    "vgg11_bn (timm)": _timm("vgg11_bn"),
}
ARCHS.update(TIMM)
METHODS = ["lrp_epsilon (eps->0)", "cp_lrp (eps->0)", "attnlrp (eps->0)", "lrp_alpha2_beta1",
           "lrp_epsilon_plus_flat", "deconvnet / guided_backprop"]
GATES = {"lrp_epsilon (eps->0)": "refuse", "cp_lrp (eps->0)": "constant", "attnlrp (eps->0)": "uniform"}
EXACT_RULES = {"BatchNorm folded into the conv/linear that feeds it",
               "BatchNorm not fed by a conv/linear: its own affine layer (epsilon rule)",
               "scaling by a constant: relevance passes unchanged", "ReLU6: relevance passes unchanged (identity rule)"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def gradient_x_input(model, x, target):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x)[torch.arange(len(x)), target].sum(), x)
    return (g * x).sum(1)


def rules_note(model: nn.Module, gates: str, x: torch.Tensor) -> str:
    extra = [r for r in canonize(model, gates=gates, example=x).rules_used if r not in EXACT_RULES]
    return f"; rules: {', '.join(extra)}" if extra else ""


# "eps -> 0" must be small against the smallest activation, not against 1: random-init nets such as
# googlenet (weights with std 0.01) score ~1e-12, where eps = 1e-12 is not negligible and showed up
# as 20-40% "errors" and conservation gaps that vanish at 1e-40 (float64 holds it easily).
TINY = 1e-40


def cell(arch: str, method: str) -> str:
    torch.manual_seed(0)
    model = randomize_batch_norm(ARCHS[arch]()).double().eval()
    side = 64
    x = torch.randn(1, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([1])
    try:
        if method in GATES:
            gates = GATES[method]
            lrp = LRP(epsilon=TINY, stabilizer=TINY, gates=gates)
            with explaining(model):
                relevance = lrp.attribute(model, x.clone(), target).sum(1)
            err = rel(relevance, gradient_x_input(model, x, target))
            note = rules_note(model, gates, x)
            if err <= 1e-8:
                return f"exact (max rel err {err:.0e}){note}"
            free = bias_free(model)
            with explaining(free):
                total = lrp.attribute(free, x.clone(), target).sum()
                score = free(x)[0, 1]
            gap = abs(float(total - score)) / abs(float(score))
            return f"supported (conservation err {gap:.0e}, bias-free copy){note}"
        if method.startswith("lrp_"):
            model = bias_free(model)
            composite = "alpha_beta" if "alpha" in method else "epsilon_plus_flat"
            lrp = LRP(composite=composite, epsilon=TINY, stabilizer=TINY, engine="zennit")
            with explaining(model):
                relevance = lrp.attribute(model, x.clone(), target)
                score = model(x)[0, 1]
            err = abs(float(relevance.sum() - score)) / abs(float(score))
            verdict = "conserves" if err <= 1e-6 else "DOES NOT conserve"
            return f"{verdict} (rel err {err:.0e}, bias-free copy){rules_note(model, 'refuse', x)}"
        for name in ("deconvnet_l2", "guided_backprop"):
            get_explainer(name)(model, x, target)
        return "supported (every ReLU, functional or module, gets the rule)"
    except ValueError as err:
        first = str(err).splitlines()
        why = first[1].strip() if len(first) > 1 and first[0].endswith(":") else first[0]
        return f"refused ({why.split(' (')[0]}: {why.split('): ')[-1][:90]})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--archs", nargs="*", default=list(ARCHS))
    args = parser.parse_args()
    lines = ["| architecture | " + " | ".join(METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    for arch in args.archs:
        lines.append(f"| {arch} | " + " | ".join(cell(arch, m).replace("|", "/") for m in METHODS) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
