"""Regenerate the figures of the documentation (docs/assets/figures/*.png) from a tiny run.

    python scripts/docs_figures.py              # a few minutes on two CPU cores

1. Trains the demo network for a short while with the AOPC callback (``heatmapbench-train
   experiment=demo`` with fewer batches and images) into a temporary folder, and copies the
   figures the tool drew: ``accuracy_vs_aopc.png``, and the curves plot and heatmap gallery of the
   last evaluation.
2. With the trained network and the library, draws the two explanatory figures of the Concepts
   pages: an image along its MoRF walk (``morf_steps.png``) and the same steps under every
   perturbation (``perturbations.png``).

The PNGs are written small (the docs show them at page width) and committed; rerun this script
when a figure's code changes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "assets" / "figures"
#: The tiny run: the demo recipe with fewer batches and evaluation images (three evaluations after
#: the one before training).
TRAIN = ["experiment=demo", "trainer.max_epochs=3", "trainer.limit_train_batches=60", "trainer.limit_val_batches=10",
         "data.eval_subset_size=64", "callbacks.aopc.subset_size=32", "callbacks.aopc.gallery_size=3",
         "progress=false", "test=false"]


def train(root: Path, reuse: bool = False) -> Path:
    """Run the tiny training under ``root`` (unless ``reuse``); return the downloaded ``aopc/`` folder."""
    if not reuse:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-m", "heatmapbench.app.train", *TRAIN, f"paths.root_dir={root}"], check=True,
                       env=env)
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("heatmapbench-demo")
    run_id = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                max_results=1)[0].info.run_id
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="aopc", tracking_uri=uri,
                                                    dst_path=str(root / "artifacts")))


def shrink(src: Path, dst: Path, width: int = 1100) -> None:
    """Copy a PNG at most ``width`` pixels wide, palette-quantised (a few tens of KB)."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        im.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


def explanatory(ckpt: Path, data_dir: Path) -> None:
    """The MoRF walk of one image, and the same steps under every perturbation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from heatmapbench.data import FashionMNISTDataModule
    from heatmapbench.evaluation.style import STYLE
    from heatmapbench.explain import get_explainer
    from heatmapbench.models import SmallCNN
    from heatmapbench.models.zoo import from_checkpoint
    from heatmapbench.perturbation import PixelSpace, get_perturbation, select_regions

    net = SmallCNN(in_channels=1, num_classes=10)
    from_checkpoint(str(ckpt), net)
    net.eval()
    data = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=16)
    data.prepare_data()
    data.setup("test")
    x = torch.stack([data.test_set[i][0] for i in (0, 1)])  # (2, 1, 28, 28) model space
    target = net(x).argmax(1)
    heatmap = get_explainer("lrp_epsilon_0.01")(net, x, target)  # (2, 28, 28)
    generator = torch.Generator().manual_seed(0)
    _, pixel_step = select_regions(heatmap, region_size=4, steps=24, order="morf", regions="grid", repeats=1,
                                   generator=generator)  # (1, 2, 28, 28)
    space = PixelSpace.build(1, data.mean, data.std, data.value_range, x.device, x.dtype)

    def perturbed(name: str, k: int) -> torch.Tensor:  # x⁽ᵏ⁾ of the first image, in [0, 1] for display
        p = get_perturbation(name)
        mask = (pixel_step[0, :1, None] <= k).to(x.dtype)  # (1, 1, H, W)
        state = p.prepare(x[:1], space, torch.Generator().manual_seed(0))
        xk = p.apply(x[:1], mask, state)
        return ((xk * space.std.view(1, -1, 1, 1) + space.mean.view(1, -1, 1, 1) - space.lo)
                / (space.hi - space.lo)).clamp(0, 1)[0, 0]

    def row(panels: list[tuple], name: str, width: float) -> None:  # images side by side, titled
        fig, axes = plt.subplots(1, len(panels), figsize=(width, 2.7))
        for ax, (img, title, cmap) in zip(axes, panels):
            limits = (-1, 1) if cmap == "seismic" else (0, 1)
            ax.imshow(img.detach(), cmap=cmap, vmin=limits[0], vmax=limits[1])
            ax.set_title(title, fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(OUT / name)
        plt.close(fig)

    clean = perturbed("uniform", 0)
    with plt.rc_context({**STYLE, "savefig.dpi": 110}):
        h = heatmap[0] / heatmap[0].abs().max()
        row([(clean, "image x⁽⁰⁾", "gray"), (h, "ε-LRP heatmap", "seismic")]
            + [(perturbed("uniform", k), f"x⁽{k}⁾: {k} regions removed", "gray") for k in (4, 8, 16)],
            "morf_steps.png", 11)
        names = ["uniform", "mean", "constant", "blur", "road"]
        row([(clean, "clean", "gray")] + [(perturbed(n, 8), n, "gray") for n in names], "perturbations.png", 12)
    for name in ("morf_steps.png", "perturbations.png"):
        shrink(OUT / name, OUT / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="train into this folder and keep it (default: a temporary one)")
    parser.add_argument("--reuse", type=Path, help="draw from the run already in this folder (a --keep folder)")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.reuse or args.keep or Path(tmp)
        artifacts = train(root, reuse=args.reuse is not None)
        last = sorted(artifacts.glob("epoch_*"))[-1]
        shrink(artifacts / "accuracy_vs_aopc.png", OUT / "accuracy_vs_aopc.png", width=1000)
        shrink(last / "aopc_curves.png", OUT / "aopc_curves.png")
        shrink(last / "heatmap_gallery.png", OUT / "heatmap_gallery.png", width=900)
        ckpt = next(root.glob("outputs/demo/runs/*/checkpoints/last.ckpt"))
        explanatory(ckpt, root / "data")
    for path in sorted(OUT.glob("*.png")):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
