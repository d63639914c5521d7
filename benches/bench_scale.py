"""An evaluation written batch by batch at scale: peak memory, and what the writing costs.

Two figures for ``heatmapbench-evaluate`` with the small CNN on Fashion-MNIST (untrained weights:
they change neither memory nor time), ``evaluation=small_images``, on the CPU:

  (a) peak memory (max RSS) of a whole ``--images`` evaluation, the merge of the shards, the
      statistics, tables, figures and MLflow logging included, each in a fresh process, against
      an evaluation of one batch: what grows with the images is the per-image summaries only;
      also the merge alone (reading every shard back) in a fresh process, and the shards' bytes;
  (b) the shard writer's time per image (``save_shard``) and the merge's (``merge_shards``)
      against the engine's (``evaluate_batch``), measured on the same batches in one process.

    python benches/bench_scale.py [--images 5000] [--batch-size 250] [--timed-batches 4] [--quick]

``--quick`` runs both parts small (60 images, batches of 20) to prove the script works; its
figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EVAL = ["model=small_cnn", "data=fashion_mnist", "evaluation=small_images", "device=cpu", "progress=false",
        "evaluation.explainers=[sensitivity_l2,gradient_x_input,lrp_epsilon_0.01]", "evaluation.orders=[morf,lerf]"]


def _mib(kib: int) -> float:
    return kib / 1024.0


def child_peak(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``command`` to completion in a fresh child; its peak RSS (MiB) and wall seconds."""
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} … failed:\n{proc.stderr[-3000:]}")
    return _mib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss), seconds


def measure(args: argparse.Namespace) -> None:
    """``--measure``: run one command in a child and print its peak RSS and time as JSON (so that every
    measured process has a parent of its own: RUSAGE_CHILDREN is the max over all waited children)."""
    peak, seconds = child_peak(args.command, dict(os.environ))
    print(json.dumps({"peak_mib": peak, "seconds": seconds}))


def peak_of(command: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", "--", *command], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def evaluate_command(tmp: Path, name: str, images: int, batch_size: int, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "heatmapbench.app.evaluate", *EVAL, f"num_images={images}",
            f"data.batch_size={batch_size}", f"paths.data_dir={data_dir}", f"paths.mlruns_dir={tmp}/mlruns",
            f"hydra.run.dir={tmp}/{name}", "logger.experiment_name=bench-scale"]


def part_memory(tmp: Path, images: int, batch_size: int, data_dir: Path) -> Path:
    one = peak_of(evaluate_command(tmp, "one_batch", batch_size, batch_size, data_dir))
    whole = peak_of(evaluate_command(tmp, "whole", images, batch_size, data_dir))
    folder = tmp / "whole" / "batches"
    merge = peak_of([sys.executable, "-c", "import sys; from heatmapbench.evaluation.shards import merge_shards; "
                     f"merge_shards(sys.argv[1], {images}, gallery_size=6)", str(folder)])
    base = peak_of([sys.executable, "-c", "import heatmapbench.evaluation.shards"])
    shard_bytes = sum(p.stat().st_size for p in folder.glob("batch-*.npz"))
    print(f"(a) peak RSS, each in a fresh process ({images} images in batches of {batch_size}):")
    print(f"    evaluation of {images:>6} images: {whole['peak_mib']:8.1f} MiB   ({whole['seconds']:.0f} s)")
    print(f"    evaluation of {batch_size:>6} images: {one['peak_mib']:8.1f} MiB   ({one['seconds']:.0f} s)")
    grow = (whole["peak_mib"] - one["peak_mib"]) / max(images - batch_size, 1) * 1024
    print(f"    growth: {grow:.2f} KiB per image; ratio whole / one batch: x{whole['peak_mib'] / one['peak_mib']:.2f}")
    print(f"    merge of the shards alone: {merge['peak_mib']:.1f} MiB ({merge['peak_mib'] - base['peak_mib']:+.1f} MiB "
          f"over the import, {base['peak_mib']:.1f} MiB); shards on disk: {shard_bytes / 2**20:.2f} MiB, "
          f"{shard_bytes / images:.0f} bytes per image")
    return data_dir


def part_overhead(tmp: Path, batch_size: int, timed: int, data_dir: Path) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from heatmapbench.app.evaluate import build_inputs
    from heatmapbench.evaluation import evaluate_batch
    from heatmapbench.evaluation.shards import merge_shards, save_shard
    from heatmapbench.registry import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("evaluate", EVAL + [f"data.batch_size={batch_size}", f"paths.data_dir={data_dir}",
                                          f"paths.mlruns_dir={tmp}/mlruns", "paths.output_dir=" + str(tmp / "o")])
    settings, device, net, datamodule, subset, explainers, perturbation = build_inputs(cfg)
    folder = tmp / "overhead"
    engine = write = 0.0
    n = 0
    for k in range(timed + 1):  # the first batch warms up, untimed
        idx = list(range(k * batch_size, (k + 1) * batch_size))
        x = torch.stack([subset[i][0] for i in idx])
        y = torch.tensor([subset[i][1] for i in idx])
        t0 = time.perf_counter()
        part = evaluate_batch(net, x, explainers, settings, perturbation, label=y, seed_offset=idx[0],
                              **datamodule.normalization)
        t1 = time.perf_counter()
        save_shard(folder, torch.tensor(idx), part)
        t2 = time.perf_counter()
        if k:
            engine, write, n = engine + t1 - t0, write + t2 - t1, n + len(idx)
    t0 = time.perf_counter()
    merge_shards(folder, (timed + 1) * batch_size)
    merge = (time.perf_counter() - t0) / ((timed + 1) * batch_size)
    print(f"(b) per image, {n} images in batches of {batch_size} ({len(explainers)} explainers, "
          f"{len(settings.orders)} orders, L={settings.steps}):")
    print(f"    engine (evaluate_batch): {engine / n * 1e3:9.3f} ms")
    print(f"    shard writer (save_shard): {write / n * 1e3:7.3f} ms   = {write / engine:.2e} of the engine")
    print(f"    merge (merge_shards):      {merge * 1e3:7.3f} ms   = {merge / (engine / n):.2e} of the engine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--timed-batches", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="small, to prove the script runs")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("command", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args)
    if args.quick:
        args.images, args.batch_size, args.timed_batches = 60, 20, 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data_dir = tmp_path / "data"
        part_memory(tmp_path, args.images, args.batch_size, data_dir)
        part_overhead(tmp_path, args.batch_size, args.timed_batches, data_dir)


if __name__ == "__main__":
    main()
