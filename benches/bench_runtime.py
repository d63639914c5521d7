"""Layout and precision: forward speed, explainer speed and what low precision does to AOPC.

Prints ratios measured in one run (contenders interleaved, each one's best of ``--reps``):
  (a) forward images/s on EfficientNet-Lite0 (224²), VGGSmall (32²) and the demo's SmallCNN (28²):
      fp32 contiguous (the old path) / fp32 channels_last (the default now) / bf16 autocast, both
      layouts, with the largest logit difference from fp32 contiguous;
  (b) heatmaps/s of a few explainers, contiguous against channels_last, on the same nets;
  (c) the AOPC deviation of bf16 from fp32: ``evaluate_batch`` on the real Lite0 and the ImageNet
      sample images (paper grid 9×9, uniform noise), per explainer |Δ AOPC rel. random| in units
      of the fp32 95% CI half-width, and the wall-time ratio of the two runs;
  (d) with ``--compile``: ``torch.compile`` of the fp32 channels_last SmallCNN and VGGSmall
      (steady-state ratio and the compile time it has to win back);
  (e) the engine's images/s (``region_perturbation``, random order, uniform noise) at the automatic
      batch size (``batch_size=None``: the chunk it picks is printed) against fixed batches, and the
      largest score difference between them;
  (f) fusion (``heatmapbench.accel.fusion``: BatchNorm and symmetric zero padding folded into the
      convolutions), in channels_last: forward passes, sensitivity and guided backprop heatmaps and
      the engine (random order, L = 24), fused against unfused, with the largest difference; and
      alpha-beta LRP with "same"-padding convolutions run as plain ones against as written.

    python benches/bench_runtime.py [--threads 2] [--reps 3] [--images 8] [--steps 50] [--compile]
                                    [--skip-forwards] [--skip-batch] [--skip-fusion]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time
import warnings

import torch
from torch import nn

from bench_perturbation import interleaved  # benches/ is on sys.path when run as a script
from heatmapbench.models import SmallCNN, VGGSmall
from heatmapbench.accel.layout import channels_last, to_layout
from heatmapbench.accel.precision import autocast


def nets(lite0: bool) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = {}
    if lite0:
        from heatmapbench.models.zoo import efficientnet_lite0

        out["EfficientNet-Lite0"] = (efficientnet_lite0().eval(), torch.randn(32, 3, 224, 224, generator=g))
    torch.manual_seed(0)
    out["VGGSmall"] = (VGGSmall().eval(), torch.randn(256, 3, 32, 32, generator=g))
    out["SmallCNN"] = (SmallCNN().eval(), torch.randn(512, 1, 28, 28, generator=g))
    return out


def forward_fn(model: nn.Module, x: torch.Tensor, precision: str):
    def run():
        with torch.inference_mode(), autocast(precision, "cpu"):
            return model(x).float()
    return run


def forwards(all_nets, reps: int) -> None:
    print("\n(a) forward images/s (× = ratio to fp32 contiguous, the path before this change)")
    for name, (net, x) in all_nets.items():
        # the evaluation's own conversion (runtime.channels_last, runtime.to_layout), so that what is
        # timed is what the engine and the explainers run
        net_cl = copy.deepcopy(net)
        x_cl = to_layout(x, True)
        with channels_last(net_cl):
            fns = {"fp32 contiguous": forward_fn(net, x, "fp32"), "fp32 channels_last": forward_fn(net_cl, x_cl, "fp32"),
                   "bf16 contiguous": forward_fn(net, x, "bf16"), "bf16 channels_last": forward_fn(net_cl, x_cl, "bf16")}
            ref = fns["fp32 contiguous"]()
            diffs = {k: float((fn() - ref).abs().max()) for k, fn in fns.items()}
            t = interleaved(fns, reps)
        base = t["fp32 contiguous"]
        print(f"  {name} (batch {x.shape[0]}):")
        for k, v in t.items():
            print(f"    {k:20s} {x.shape[0] / v:8.1f} img/s  ×{base / v:.2f}   max|Δlogit| {diffs[k]:.2g}")


def explainers(all_nets, reps: int) -> None:
    from heatmapbench.explain import get_explainer

    names = ["sensitivity_l2", "deconvnet_l2", "guided_backprop", "lrp_epsilon_0.01", "lrp_alpha2_beta1"]
    print("\n(b) heatmaps/s, contiguous → channels_last (the model and inputs the evaluation hands over)")
    for name, (net, x) in all_nets.items():
        if name == "SmallCNN":
            continue
        x = x[:8] if x.shape[-1] > 100 else x[:64]
        with torch.no_grad():
            target = net(x).argmax(1)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        net_cl = copy.deepcopy(net)
        row = []
        with channels_last(net_cl):
            for e_name in names:
                e = get_explainer(e_name)
                t = interleaved({"c": lambda: e(net, x, target), "cl": lambda: e(net_cl, x_cl, target)}, reps)
                row.append(f"{e_name} {x.shape[0] / t['c']:.1f}→{x.shape[0] / t['cl']:.1f} (×{t['c'] / t['cl']:.2f})")
        print(f"  {name} (batch {x.shape[0]}): " + "; ".join(row))


def aopc_deviation(n_images: int, steps: int, random_repeats: int, precisions: tuple[str, ...] = ("bf16",),
                   device: str = "cpu", data_dir: str | None = None, batch_size: int = 64) -> None:
    """AOPC rel. random at each of ``precisions`` against fp32 on the real Lite0 and the ImageNet samples."""
    from heatmapbench.evaluation import EvaluationSettings
    from heatmapbench.data.samples import ImageNetSamplesDataModule
    from heatmapbench.evaluation import build_explainers, evaluate_batch
    from heatmapbench.metrics.summary import mean_ci
    from heatmapbench.models.zoo import efficientnet_lite0, preprocessing_of
    from heatmapbench.perturbation import Uniform

    net = efficientnet_lite0().eval().to(device)
    dm = ImageNetSamplesDataModule(data_dir=data_dir, **preprocessing_of(net).data_kwargs())
    dm.setup("test")
    x, _ = dm.eval_subset(n_images)
    x = x.to(device)
    names = ["sensitivity_l2", "deconvnet_l2", "lrp_epsilon_0.01", "lrp_alpha2_beta1"]
    print(f"\nAOPC rel. random, {'/'.join(precisions)} vs fp32 (IEEE) on {device}: EfficientNet-Lite0, "
          f"{x.shape[0]} ImageNet sample images, 9×9 grid, L={steps}, uniform noise, random ×{random_repeats}, "
          "channels_last")
    results, seconds = {}, {}
    for precision in ("fp32",) + tuple(precisions):
        settings = EvaluationSettings(explainers=names, steps=steps, random_repeats=random_repeats,
                                      batch_size=batch_size, complexity=False, precision=precision)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        results[precision] = evaluate_batch(net, x, build_explainers(names), settings, Uniform(),
                                            **dm.normalization)
        seconds[precision] = time.perf_counter() - start
    ref = results["fp32"]
    rank = lambda e: sorted(names, key=lambda n: -float(e.aopc_relative(n).mean()))  # noqa: E731
    for precision in precisions:
        low, worst = results[precision], 0.0
        print(f"  {precision}:")
        for name in names:
            m, lo, hi = mean_ci(ref.aopc_relative(name), n_boot=2000, seed=0)
            m2 = float(low.aopc_relative(name).mean())
            half = (hi - lo) / 2
            worst = max(worst, abs(m2 - m) / half)
            per_image = float((low.aopc_relative(name) - ref.aopc_relative(name)).abs().max())
            print(f"    {name:18s} fp32 {m:8.3f} [{lo:.3f}, {hi:.3f}]  {precision} {m2:8.3f}  |Δ| {abs(m2 - m):.3f} "
                  f"= {abs(m2 - m) / half:.2f} CI half-widths; per image max|Δ| {per_image:.3f}")
        same = "same" if rank(ref) == rank(low) else "DIFFERENT"
        print(f"    ranking fp32 {rank(ref)}\n            {precision} {rank(low)} ({same})")
        print(f"    wall time {precision} / fp32: {seconds[precision] / seconds['fp32']:.2f} "
              f"({seconds['fp32']:.1f} s vs {seconds[precision]:.1f} s, one pass each); "
              f"worst |Δ| {worst:.2f} half-widths")


def compiled(all_nets, reps: int) -> None:
    print("\n(d) torch.compile (inductor), fp32 channels_last, steady state after compiling")
    for name, (net, x) in all_nets.items():
        if name == "EfficientNet-Lite0":
            continue  # minutes of compile time on two cores; the small nets show the trade-off
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        start = time.perf_counter()
        comp = torch.compile(net_cl)
        forward_fn(comp, x_cl, "fp32")()
        t_compile = time.perf_counter() - start
        t = interleaved({"eager": forward_fn(net_cl, x_cl, "fp32"), "compiled": forward_fn(comp, x_cl, "fp32")}, reps)
        gain = t["eager"] - t["compiled"]
        per_batch = f"{t_compile / gain:.0f} batches of {x.shape[0]} to break even" if gain > 0 else "never pays off"
        print(f"  {name}: compiled ×{t['eager'] / t['compiled']:.2f} vs eager channels_last; "
              f"compile {t_compile:.1f} s → {per_batch}")


def engine_batches(all_nets, reps: int) -> None:
    from heatmapbench.perturbation import region_perturbation
    from heatmapbench.perturbation.engine import AUTO_BATCH_BYTES, auto_batch_size

    print(f"\n(e) engine images/s by batch_size (auto: largest tensor of a forward ≈ "
          f"{AUTO_BATCH_BYTES >> 20} MiB on a CPU), random order, L = 24, channels_last")
    for name, (net, x) in all_nets.items():
        x = x[:4] if x.shape[-1] > 100 else x[:64]
        heat = torch.rand(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            auto = auto_batch_size(lambda t: net(t), x, net)
        kw = dict(region_size=max(2, x.shape[-1] // 24), steps=24, order="random")
        fns = {f"auto ({auto})": lambda: region_perturbation(net, x, heat, **kw)}
        for bs in (8, 64, 512):
            fns[str(bs)] = lambda bs=bs: region_perturbation(net, x, heat, batch_size=bs, **kw)
        ref = fns[f"auto ({auto})"]().scores
        diff = max(float((fn().scores - ref).abs().max()) for fn in fns.values())
        t = interleaved(fns, reps)
        n = x.shape[0] * 25
        cells = ", ".join(f"{k} {n / v:.1f}" for k, v in t.items())
        t_auto = t[f"auto ({auto})"]
        best_fixed = min(v for k, v in t.items() if not k.startswith("auto"))
        print(f"  {name} ({x.shape[0]} images): {cells} images/s; auto ÷ best fixed ×{best_fixed / t_auto:.2f}, "
              f"÷ 64 ×{t['64'] / t_auto:.2f}; max |Δscore| {diff:.1g}")


def fusion_gain(all_nets, reps: int) -> None:
    from heatmapbench.explain import get_explainer
    from heatmapbench.accel.fusion import FusedConv, fused, fusion
    from heatmapbench.perturbation import region_perturbation

    print("\n(f) fused ÷ unfused speed (× > 1: fusion is faster), channels_last, fp32")
    for name, (net, x) in all_nets.items():
        big = x.shape[-1] > 100
        net_cl = copy.deepcopy(net)
        x_cl = to_layout(x, True)
        xe = x_cl[:8] if big else x_cl[:64]  # explainer batch
        xs = x[:4] if big else x[:64]  # engine batch
        heat = torch.rand(xs.shape[0], *xs.shape[2:], generator=torch.Generator().manual_seed(0))
        kw = dict(region_size=max(2, x.shape[-1] // 24), steps=24, order="random")
        with channels_last(net_cl):
            graph = fused(net_cl, x_cl[:1])
            folded = sum(isinstance(m, FusedConv) for m in graph.modules())
            with torch.no_grad():
                target = net_cl(xe).argmax(1)
            sens, guided = get_explainer("sensitivity_l2"), get_explainer("guided_backprop")

            def unfused(fn):
                def run():
                    with fusion(False):
                        return fn()
                return run

            pairs = {
                "forward": (forward_fn(graph, x_cl, "fp32"), forward_fn(net_cl, x_cl, "fp32")),
                "sensitivity": (lambda: sens(net_cl, xe, target), unfused(lambda: sens(net_cl, xe, target))),
                "guided backprop": (lambda: guided(net_cl, xe, target), unfused(lambda: guided(net_cl, xe, target))),
            }
        pairs["engine"] = (lambda: region_perturbation(net, xs, heat, **kw).scores,
                           lambda: region_perturbation(net, xs, heat, fuse=False, **kw).scores)
        # LRP is not fused, but its canonical graph runs a "same"-padding convolution as a plain one
        # with the pad in its padding (explain.canonize.layers.plain_conv_twin); "off" canonizes a copy without that
        import heatmapbench.explain.canonize.rewriter as graph_module

        as_written = copy.deepcopy(net)
        twin, graph_module.plain_conv_twin = graph_module.plain_conv_twin, lambda module: None
        try:
            graph_module.canonize(as_written)  # cached per model: this copy keeps its pads
        finally:
            graph_module.plain_conv_twin = twin
        ab = get_explainer("lrp_alpha2_beta1")
        xa, ta = x[:xe.shape[0]], target
        pairs["alpha-beta LRP"] = (lambda: ab(net, xa, ta), lambda: ab(as_written, xa, ta))
        cells = []
        for what, (on, off) in pairs.items():
            with channels_last(net_cl) if what not in ("engine", "alpha-beta LRP") else contextlib.nullcontext():
                diff = float((on() - off()).abs().max())
                t = interleaved({"on": on, "off": off}, reps)
            cells.append(f"{what} ×{t['off'] / t['on']:.2f} (max|Δ| {diff:.1g})")
        print(f"  {name} ({folded} convolutions fused): " + "; ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--images", type=int, default=8, help="images of (c)")
    ap.add_argument("--steps", type=int, default=50, help="L of (c)")
    ap.add_argument("--random-repeats", type=int, default=3, help="random orderings of (c)")
    ap.add_argument("--no-lite0", action="store_true", help="skip EfficientNet-Lite0 (needs the [zoo] extra)")
    ap.add_argument("--skip-aopc", action="store_true", help="skip (c)")
    ap.add_argument("--compile", action="store_true", help="also (d), minutes of compiling")
    ap.add_argument("--skip-forwards", action="store_true", help="skip (a) and (b)")
    ap.add_argument("--skip-batch", action="store_true", help="skip (e)")
    ap.add_argument("--skip-fusion", action="store_true", help="skip (f)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    print(f"setup: torch {torch.__version__}, {args.threads} threads, cpu, native bf16: "
          f"{', '.join(native) or 'none (bf16 is emulated)'}, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    all_nets = nets(not args.no_lite0)
    if not args.skip_forwards:
        forwards(all_nets, args.reps)
        explainers(all_nets, args.reps)
    if not args.skip_aopc and not args.no_lite0:
        aopc_deviation(args.images, args.steps, args.random_repeats)
    if args.compile:
        compiled(all_nets, args.reps)
    if not args.skip_batch:
        engine_batches(all_nets, args.reps)
    if not args.skip_fusion:
        fusion_gain(all_nets, args.reps)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
