"""What the image-folder scan costs per image: the full check against a header-only one.

``ImageFolderDataModule`` checks every file before any work (``data/imagefolder.py``): header, mode,
and a decode of the whole file, since damage in the middle of a JPEG shows only when it is decoded.
Measured on one folder of random-texture JPEGs (``--size`` pixels, quality 90, like ILSVRC2012 val),
each figure the best of ``--repeats`` passes over all files, on this machine:

  header     ``Image.open`` and the mode (what no longer suffices);
  draft      ``check_image``: the decode at 1/8 scale it does (one thread);
  full       a decode at full size (what the data loader does once per image and epoch);
  scan       the scan itself (``_scan``: ``check_image`` on a thread pool) over the folder.

    python benches/bench_image_scan.py [--images 400] [--size 500x375] [--repeats 3] [--quick]

``--quick`` runs 12 small images to prove the script works; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, images: int, size: tuple[int, int]) -> list[str]:
    """``images`` JPEGs of smooth random texture (compressible like photos) in ``root/class0``."""
    rng = np.random.default_rng(0)
    folder = root / "class0"
    folder.mkdir(parents=True)
    width, height = size
    files = []
    for i in range(images):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        path = folder / f"{i:05d}.jpg"
        image.save(path, "JPEG", quality=90)
        files.append(str(path))
    return files


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--size", default="500x375")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="12 small images: proves the bench runs, times nothing")
    args = ap.parse_args()
    if args.quick:
        args.images, args.size, args.repeats = 12, "64x48", 1
    size = tuple(int(v) for v in args.size.split("x"))

    from torchvision import datasets

    from heatmapbench.data.imagefolder import ImageFolderDataModule, RGB_MODES, check_image

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = make_folder(root, args.images, size)

        def header() -> None:
            for f in files:
                with Image.open(f) as image:
                    assert image.mode in RGB_MODES

        def draft() -> None:
            for f in files:
                check_image(f)

        def full() -> None:
            for f in files:
                with Image.open(f) as image:
                    image.load()

        module = ImageFolderDataModule(str(root), image_size=32, resize=32)
        folder = datasets.ImageFolder(str(root))

        def scan() -> None:
            module._scan(folder, root)

        per_image = {name: best_of(args.repeats, fn) / len(files) * 1e3
                     for name, fn in (("header", header), ("draft", draft), ("full", full), ("scan", scan))}
    print(f"{len(files)} JPEGs of {args.size}, best of {args.repeats}, {os.cpu_count()} CPUs"
          + (" (--quick: no figures)" if args.quick else ""))
    for name, ms in per_image.items():
        print(f"  {name:<7} {ms:8.3f} ms/image")
    print(f"  draft / full decode: {per_image['draft'] / per_image['full']:.2f}; "
          f"scan / full decode: {per_image['scan'] / per_image['full']:.2f}")


if __name__ == "__main__":
    main()
