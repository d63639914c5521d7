"""The paper's ILSVRC protocol on one GPU: throughput, and minutes projected to 5040 images.

Samek et al. (arXiv 1509.06321, Sec. 4) score the first 5040 ILSVRC2012 validation images
(224², 9×9 regions, L = 100, uniform noise): MoRF for each heatmap method, and the random
ordering with 10 repeats, which all methods share. This bench times the pieces that
``evaluate_batch`` runs, with the same code, on ``--images`` images and projects linearly to 5040
(the engine's work is one forward per (image, step) input, in fixed-size chunks):

  random baseline    region_perturbation(order="random", repeats=10): N·(1 + 10·L) forwards, once;
  per method         the explainer's heatmaps + region_perturbation(order="morf"): N·(1 + L) forwards;
  ε-LRP protocol     random baseline + ε-LRP (what the issue names), and all six paper methods.

Nets: AlexNet (torchvision architecture with random weights: the paper's BVLC CaffeNet is an
AlexNet variant, and weights do not change the speed) and EfficientNet-Lite0 (its real ImageNet
weights; inputs are the 20 foolbox ImageNet samples cycled to ``--images``). Precisions: fp32
(IEEE: heatmapbench switches TF32 off), tf32, bf16 and fp16 autocast. An end-to-end
``evaluate_batch`` call with ε-LRP checks that the pieces add up, and the AOPC deviation of each
low precision from fp32 is measured on the 20 real images (``bench_runtime.aopc_deviation``).

Each (net, precision) first runs every piece once untimed at the timed shapes: the first call of
a shape pays cuDNN's kernel selection and runtime compilation (≈ 20 s on Lite0, printed), which
5040 images amortise.

    python benches/bench_gpu_protocol.py [--images 128] [--batch-size 512] [--nets lite0] [--samples DIR]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

PAPER_IMAGES = 5040
METHODS = ["sensitivity_l2", "sensitivity_linf", "deconvnet_l2", "lrp_epsilon_0.01", "lrp_epsilon_100",
           "lrp_alpha2_beta1"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def images(n: int, samples: str | None, size: int = 224) -> tuple[torch.Tensor, str]:
    """``n`` images in [0, 255] pixel space: the ImageNet samples cycled, else uniform noise."""
    try:
        from heatmapbench.data.samples import ImageNetSamplesDataModule

        dm = ImageNetSamplesDataModule(data_dir=samples, image_size=size, resize=256,
                                       mean=[0.0, 0.0, 0.0], std=[1 / 255] * 3)
        x, _ = dm.eval_subset(20)
        src = f"the {x.shape[0]} ImageNet samples cycled"
    except Exception as err:  # noqa: BLE001 - the bench still times on noise, and says so
        x = torch.rand(20, 3, size, size) * 255
        src = f"uniform noise (samples unavailable: {err})"
    reps = -(-n // x.shape[0])
    return x.repeat(reps, 1, 1, 1)[:n].contiguous(), src


def build_nets(device: torch.device):
    """(name, net, mean, std, value_range) on ``device``: inputs are (px/255 − mean)/std."""
    import torchvision

    from heatmapbench.models.zoo import efficientnet_lite0

    torch.manual_seed(0)
    out = [("AlexNet (CaffeNet-like, random weights)", torchvision.models.alexnet().eval().to(device),
            [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    try:
        out.append(("EfficientNet-Lite0 (ImageNet weights)", efficientnet_lite0().eval().to(device),
                    [127 / 255] * 3, [128 / 255] * 3))
    except Exception as err:  # noqa: BLE001
        print(f"  EfficientNet-Lite0 skipped: {err}")
    return out


def protocol(name, net, x255, mean, std, precisions, steps, batch_size, device, methods) -> None:
    from heatmapbench.evaluation import EvaluationSettings
    from heatmapbench.evaluation import build_explainers, evaluate_batch
    from heatmapbench.perturbation import Uniform, region_perturbation
    from heatmapbench.accel.layout import fast_model, to_layout
    from heatmapbench.accel.precision import autocast

    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    x = ((x255.to(device) / 255 - m) / s).contiguous()
    n = x.shape[0]
    explainers = build_explainers(methods)
    pert = Uniform()
    norm = dict(mean=mean, std=std, value_range=(0.0, 1.0))
    print(f"\n{name}: {n} images 224², 9×9 grid, L={steps}, engine batch {batch_size}")
    for precision in precisions:
        try:
            common = dict(region_size=9, steps=steps, perturbation=pert, batch_size=batch_size,
                          precision=precision, seed=0, **norm)
            with fast_model(net) as nhwc:
                xl = to_layout(x, nhwc)
                with torch.no_grad():
                    target = torch.cat([net(xl[i:i + 256]).argmax(1) for i in range(0, n, 256)])
                zeros = torch.zeros(n, 224, 224, device=device)
                # Warm-up at the timed shapes: the first call of a (shape, dtype) pays cuDNN's kernel
                # selection and runtime compilation (seconds on Lite0's depthwise convolutions), once
                # per process; 5040 images amortise it, so the projection uses steady-state times.
                def warm_up():
                    region_perturbation(net, xl, zeros, target=target, order="random", repeats=1, **common)
                    for e in explainers.values():
                        with autocast(precision, device):
                            for i in range(0, n, 64):
                                e(net, xl[i:i + 64], target[i:i + 64])
                _, t_warm = timed(warm_up, device)
                _, t_rnd = timed(lambda: region_perturbation(net, xl, zeros, target=target, order="random",
                                                               repeats=10, **common), device)
                fwd_rnd = n * (1 + 10 * steps)
                per_method = {}
                for label, e in explainers.items():
                    try:
                        with autocast(precision, device):
                            heat, t_heat = timed(lambda: torch.cat([e(net, xl[i:i + 64], target[i:i + 64])
                                                                    for i in range(0, n, 64)]), device)
                        _, t_morf = timed(lambda: region_perturbation(net, xl, heat, target=target, order="morf",
                                                                      repeats=1, **common), device)
                        per_method[label] = (t_heat, t_morf)
                    except Exception as err:  # noqa: BLE001 - e.g. a heatmap overflowing in fp16
                        print(f"    {label:18s} FAILED {type(err).__name__}: {str(err)[:200]}")
            scale = PAPER_IMAGES / n / 60
            eps = per_method.get("lrp_epsilon_0.01")
            print(f"  {precision}: random ×10 {fwd_rnd / t_rnd:8.0f} forwards/s → {t_rnd * scale:5.2f} min "
                  f"for {PAPER_IMAGES} images (once, shared by all methods); first-call warm-up {t_warm:.1f} s")
            for label, (t_heat, t_morf) in per_method.items():
                print(f"    {label:18s} heatmaps {n / t_heat:7.0f} img/s, MoRF {n * (1 + steps) / t_morf:7.0f} "
                      f"forwards/s → {(t_heat + t_morf) * scale:5.2f} min per method")
            total_all = t_rnd + sum(a + b for a, b in per_method.values())
            if eps is not None:
                print(f"    ε-LRP protocol (random ×10 + ε-LRP MoRF): {(t_rnd + sum(eps)) * scale:5.2f} min; "
                      f"all {len(per_method)} methods: {total_all * scale:5.2f} min for {PAPER_IMAGES} images")
            # the same work through evaluate_batch (what heatmapbench-evaluate calls), ε-LRP only
            settings = EvaluationSettings(explainers=["lrp_epsilon_0.01"], steps=steps, random_repeats=10,
                                          batch_size=batch_size, complexity=False, precision=precision)
            _, t_e2e = timed(lambda: evaluate_batch(net, x, build_explainers(["lrp_epsilon_0.01"]), settings,
                                                    pert, target=target, **norm), device)
            if eps is not None:
                print(f"    evaluate_batch, ε-LRP end to end: {t_e2e:.2f} s vs the pieces {t_rnd + sum(eps):.2f} s "
                      f"→ {t_e2e * scale:5.2f} min for {PAPER_IMAGES} images")
        except Exception as err:  # noqa: BLE001 - one failed precision must not cost the others
            print(f"  {precision}: FAILED {type(err).__name__}: {err}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96, help="images timed (projected to 5040)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=512, help="engine batch (evaluation.batch_size)")
    ap.add_argument("--precisions", default="fp32,tf32,bf16,fp16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", default=None, help="folder of imagenet_<i>_<label>.jpg (default: foolbox's)")
    ap.add_argument("--device", default=None, help="default: cuda; without a GPU the bench is skipped "
                    "unless --device cpu (hours at these settings)")
    ap.add_argument("--skip-deviation", action="store_true")
    ap.add_argument("--nets", default="", help="comma-separated name parts, e.g. lite0 (default: all)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.device is None and not torch.cuda.is_available():
        print("bench_gpu_protocol: no CUDA device, skipped (pass --device cpu to run it on the CPU anyway)")
        return
    device = torch.device(args.device or "cuda")
    precisions = [p for p in args.precisions.split(",") if device.type == "cuda" or p in ("fp32", "bf16")]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"setup: torch {torch.__version__}, device {gpu}, cudnn.benchmark {torch.backends.cudnn.benchmark}, "
          f"{os.cpu_count()} CPU cores")
    x255, src = images(args.images, args.samples)
    print(f"inputs: {src}")
    for name, net, mean, std in build_nets(device):
        if args.nets and not any(k.lower() in name.lower() for k in args.nets.split(",")):
            continue
        protocol(name, net, x255, mean, std, precisions, args.steps, args.batch_size, device,
                 args.methods.split(","))
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_deviation:
        from bench_runtime import aopc_deviation  # benches/ is on sys.path when run as a script

        try:
            aopc_deviation(20, args.steps, 10, tuple(p for p in precisions if p != "fp32"), device=str(device),
                           data_dir=args.samples, batch_size=args.batch_size)
        except Exception as err:  # noqa: BLE001
            print(f"AOPC deviation FAILED {type(err).__name__}: {err}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
