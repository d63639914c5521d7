"""Per-image results written batch by batch, and merged back into one :class:`Evaluation`.

A long evaluation keeps nothing in memory between batches: each scored batch becomes one
*shard*, an NPZ file in the run's ``batches/`` folder, as soon as it is done. A shard holds, for
the batch's images, what every table, figure and statistic is computed from:

=============================  ===========  ==============================================
key                            shape        what
=============================  ===========  ==============================================
``image``                      (B,) int64   the images' indices in the evaluated set
``random_curves``              (B, L+1)     the random ordering's curve
``curves/<explainer>/<order>`` (B, L+1)     each explainer's curve in each order
``complexity/<explainer>/<k>`` (B,)         PNG / JPEG bytes and entropy of the heatmaps
``target``, ``label``          (B,)         the scored class and (when known) the true one
``clean_scores``               (B,)         f(x⁽⁰⁾)
``gallery_image``              (G,) int64   the images of the batch that the gallery shows
``gallery_x``, ``gallery/<e>`` (G, …)       those images and their heatmaps
``meta``                       ()  str      JSON: steps, explainers, orders, seconds, forwards
=============================  ===========  ==============================================

A shard is written to a temporary name and renamed, so a process killed at any moment leaves
complete shards only (a stray ``*.tmp`` is ignored). :func:`merge_shards` reads every shard of a
folder, checks that each image of the evaluated set is there exactly once, and joins them in
image order by :meth:`Evaluation.concat`, the same join as for the batches of one process (so the
result equals theirs, tensor for tensor). Its memory is that of the per-image summaries, not of the images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from heatmapbench.evaluation.core import Evaluation

#: Shard files of a folder (``batch-<first image>-r<rank>.npz``).
SHARD_GLOB = "batch-*.npz"


class ShardError(ValueError):
    """The shards of a folder do not make up one evaluation (an image missing, doubled, or mixed settings)."""


def shard_path(folder: Path, images: Tensor, rank: int = 0) -> Path:
    """Where the shard of the batch of ``images`` (global indices) goes."""
    return folder / f"batch-{int(images.min()):09d}-r{rank}.npz"


def save_shard(folder: str | Path, images: Tensor, evaluation: Evaluation, rank: int = 0) -> Path:
    """Write one batch's results atomically; ``images`` (B,) are the global indices of its rows.

    The gallery rows of ``evaluation`` (``gallery_x``, ``gallery_heatmaps``) belong to its first
    images, in order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = torch.as_tensor(images).long().cpu()
    if images.shape != (evaluation.num_images,):
        raise ValueError(f"{tuple(images.shape)} image indices for a batch of {evaluation.num_images} images")
    arrays: dict[str, np.ndarray] = {"image": images.numpy(), "random_curves": evaluation.random_curves.numpy()}
    for name, by_order in evaluation.curves.items():
        for order, curve in by_order.items():
            arrays[f"curves/{name}/{order}"] = curve.numpy()
    for name, by_kind in evaluation.complexity.items():
        for kind, values in by_kind.items():
            arrays[f"complexity/{name}/{kind}"] = values.numpy()
    for key in ("target", "label", "clean_scores"):
        value = getattr(evaluation, key)
        if value is not None:
            arrays[key] = value.numpy()
    if evaluation.gallery_x is not None:
        arrays["gallery_image"] = images[:evaluation.gallery_x.shape[0]].numpy()
        arrays["gallery_x"] = evaluation.gallery_x.numpy()
        for name, heatmaps in evaluation.gallery_heatmaps.items():
            arrays[f"gallery/{name}"] = heatmaps.numpy()
    meta = {"steps": evaluation.steps, "explainers": {n: list(c) for n, c in evaluation.curves.items()},
            "complexity": {n: list(c) for n, c in evaluation.complexity.items()}, "seconds": evaluation.seconds,
            "forwards": evaluation.forwards}
    arrays["meta"] = np.array(json.dumps(meta))
    path = shard_path(folder, images, rank)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)  # a reader (or a resumed run) sees the whole shard or none of it
    return path


def load_shard(path: str | Path) -> tuple[Tensor, Evaluation]:
    """The global image indices (B,) and the :class:`Evaluation` of one shard."""
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        get = lambda key: torch.from_numpy(data[key]) if key in data.files else None  # noqa: E731
        gallery_x = get("gallery_x")
        evaluation = Evaluation(
            steps=int(meta["steps"]),
            curves={n: {o: get(f"curves/{n}/{o}") for o in orders} for n, orders in meta["explainers"].items()},
            random_curves=get("random_curves"),
            complexity={n: {k: get(f"complexity/{n}/{k}") for k in kinds} for n, kinds in meta["complexity"].items()},
            target=get("target"), label=get("label"), clean_scores=get("clean_scores"), gallery_x=gallery_x,
            gallery_heatmaps={} if gallery_x is None else {n: get(f"gallery/{n}") for n in meta["explainers"]},
            seconds=float(meta["seconds"]), forwards=str(meta.get("forwards", "")))
        return get("image"), evaluation


def shard_files(folder: str | Path) -> list[Path]:
    """The complete shards of ``folder`` (none when it does not exist), by name."""
    folder = Path(folder)
    return sorted(folder.glob(SHARD_GLOB)) if folder.is_dir() else []


def images_done(folder: str | Path) -> np.ndarray:
    """Sorted global indices of the images the shards of ``folder`` hold (each shard's index array only)."""
    parts = []
    for path in shard_files(folder):
        with np.load(path, allow_pickle=False) as data:
            parts.append(data["image"])
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def _check_coverage(images: np.ndarray, num_images: int, folder: Path) -> None:
    counts = np.bincount(images[(images >= 0) & (images < num_images)], minlength=num_images)
    outside = images[(images < 0) | (images >= num_images)]
    if len(outside):
        raise ShardError(f"{folder} holds images {outside[:5].tolist()} outside the {num_images} evaluated")
    doubled, missing = np.flatnonzero(counts > 1), np.flatnonzero(counts == 0)
    if len(doubled):
        raise ShardError(f"{folder} holds images {doubled[:5].tolist()} (of {len(doubled)}) more than once")
    if len(missing):
        raise ShardError(f"{folder} lacks images {missing[:5].tolist()} (of {len(missing)}); "
                         "resume the run to score them")


def join_shards(shards: Sequence[tuple[Tensor, Evaluation]], gallery_size: int) -> tuple[Tensor, Evaluation]:
    """Join shards in any order into one evaluation sorted by image index (:meth:`Evaluation.concat`, the
    in-memory join); returns (images, evaluation)."""
    if not shards:
        raise ShardError("no shards to join")
    images = [i for i, _ in shards]
    try:
        joined = Evaluation.concat([e for _, e in shards], gallery_size, images=images)
    except ValueError as err:
        raise ShardError(f"the shards cannot be joined: {err}") from err
    return torch.sort(torch.cat(images), stable=True).values, joined


def merge_shards(folder: str | Path, num_images: int, gallery_size: int = 0) -> Evaluation:
    """The whole evaluation of images ``0 … num_images−1`` from the shards of ``folder``.

    Raises :class:`ShardError` when an image is missing or held twice (a lost or doubled image
    would change every mean silently).
    """
    folder = Path(folder)
    shards = [load_shard(path) for path in shard_files(folder)]
    if not shards:
        raise ShardError(f"{folder} holds no shards ({SHARD_GLOB})")
    images, joined = join_shards(shards, gallery_size)
    _check_coverage(images.numpy(), num_images, folder)
    return joined


def plan_batches(num_images: int, batch_size: int, done: Sequence[int] | np.ndarray = ()) -> list[list[int]]:
    """The batches still to score: images ``0 … num_images−1`` in a fixed grid of ``batch_size``, less ``done``.

    Batch ``k`` holds images ``k·batch_size …`` and is scored with ``seed_offset`` = its first
    image, whatever process scores it: the random draws of an image depend on the grid only, so
    one process, N processes and a resumed run give the same numbers (the grid's batch size
    unchanged). Images already ``done`` are left out; empty batches are dropped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: must be >= 1")
    todo = np.ones(num_images, dtype=bool)
    done = np.asarray(done, dtype=np.int64)
    todo[done[(done >= 0) & (done < num_images)]] = False
    batches = [np.flatnonzero(todo[s:s + batch_size]) + s for s in range(0, num_images, batch_size)]
    return [b.tolist() for b in batches if len(b)]
