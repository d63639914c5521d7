"""Benchmark incremental curve walks against the fastest full engine (Krypton-style reuse).

For each model, region size and order, one run prints:
  * incremental ÷ full: the time of ``region_perturbation(..., incremental="off")`` (fused graph,
    automatic layout and batch: the engine's fastest full forwards) over ``incremental="on"``, the
    two run in alternation, best of ``--reps``; above 1 the incremental walk is faster;
  * the largest relative difference of their scores (float reassociation only);
  * what ``incremental="auto"`` chooses (its one-time probe) and how far the incremental part
    reaches (operations computed in windows);
  * memory: the kept activations (bytes per image × images walked together) and the process's
    peak resident memory (CPU) or peak allocated memory (CUDA) of each mode.

Models (random weights, the paper's CaffeNet class and today's nets): VGG16, AlexNet, ResNet50,
EfficientNet-Lite0 at 224², the demo SmallCNN at 28² (4×4 regions there: 9×9 would be a third of
the image). Default: 9×9 regions (``--regions 4 9 16`` adds the others), L = 100, MoRF and random.

    python benches/bench_incremental.py [--models vgg16 alexnet resnet50 lite0 smallcnn]
        [--images 16] [--steps 100] [--regions 9] [--threads 2] [--reps 2] [--device cpu]
    python benches/bench_incremental.py --quick     # proves it runs (small sizes; no figures)
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from heatmapbench.perturbation import incremental as inc
from heatmapbench.perturbation import region_perturbation


def build(name: str, size: int) -> tuple[torch.nn.Module, int, int]:
    """(model, channels, image side) with random weights."""
    import torchvision

    if name == "smallcnn":
        from heatmapbench.models import SmallCNN

        return SmallCNN(), 1, 28
    if name == "lite0":
        from heatmapbench.models.zoo import efficientnet_lite0

        return efficientnet_lite0(pretrained=False, image_size=size), 3, size
    return getattr(torchvision.models, {"vgg16": "vgg16", "alexnet": "alexnet", "resnet50": "resnet50"}[name])(), 3, size


def peak_memory(device: torch.device) -> float:
    """MiB: peak allocated on CUDA (reset after reading), else the process's peak resident set."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vgg16", "alexnet", "resnet50", "lite0", "smallcnn"])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--regions", type=int, nargs="+", default=[9])
    ap.add_argument("--orders", nargs="+", default=["morf", "random"])
    ap.add_argument("--size", type=int, default=224, help="image side of the ImageNet nets")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: proves the bench runs, times nothing")
    args = ap.parse_args()
    if args.quick:
        args.images, args.steps, args.size, args.reps, args.regions = 2, 3, 64, 1, args.regions[:1]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.threads} threads, {device}, load {os.getloadavg()[0]:.1f}, "
          f"{args.images} images, L = {args.steps}" + (" (--quick: no figures)" if args.quick else ""))
    print(f"{'model':9} {'P':>3} {'order':6} {'incr/full':>9} {'rel.diff':>9} {'kept MiB':>9} "
          f"{'peak full':>9} {'peak incr':>9}  auto / reach")
    for name in args.models:
        torch.manual_seed(0)
        model, c, side = build(name, args.size)
        model = model.to(device).eval()
        g = torch.Generator().manual_seed(0)
        x = torch.rand(args.images, c, side, side, generator=g).to(device)
        hm = torch.randn(args.images, side, side, generator=g).to(device)
        for p in args.regions:
            p_used = min(p, 4) if name == "smallcnn" and p > 4 and not args.quick else p
            steps = min(args.steps, (side // p_used) ** 2)  # SmallCNN at 28²: 49 regions of 4×4
            if steps < args.steps:
                print(f"{name}: L = {steps} (its {steps} regions of {p_used}×{p_used})")
            for order in args.orders:
                kw = dict(region_size=p_used, steps=steps, order=order, regions="grid")
                auto = region_perturbation(model, x[:2], hm[:2], incremental="auto", **kw).settings["incremental"]
                best, res, peaks = {}, {}, {}
                for i in range(args.reps + 1):  # the first round warms up (plans, kernels)
                    for mode in ("off", "on"):
                        peak_memory(device)
                        t = time.perf_counter()
                        res[mode] = region_perturbation(model, x, hm, incremental=mode, **kw)
                        if i:
                            best[mode] = min(best.get(mode, float("inf")), time.perf_counter() - t)
                        peaks[mode] = peak_memory(device)
                rel = float((res["on"].scores - res["off"].scores).abs().max() / res["off"].scores.abs().max())
                plan = inc.plan_for(_net(model, x), x[:1], p_used, torch.inference_mode)
                kept = plan.bytes_per_image * inc.CurveWalker.group_size(plan, args.images, device) / 2**20
                print(f"{name:9} {p_used:>3} {order:6} {best['off'] / best['on']:>9.2f} {rel:>9.1e} {kept:>9.0f} "
                      f"{peaks['off']:>9.0f} {peaks['on']:>9.0f}  {auto} / {plan.summary()}", flush=True)


def _net(model, x):
    """The graph the engine runs (fused where it folds), as the engine builds it."""
    from heatmapbench.accel.fusion import fused
    from heatmapbench.accel.layout import fast_model, to_layout

    with fast_model(model, "auto") as nhwc:
        return fused(model, to_layout(x[:1], nhwc))


if __name__ == "__main__":
    main()
