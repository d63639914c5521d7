"""The region-perturbation engine (Samek et al., arXiv 1509.06321, Sec. 3): curves and AOPC.

For every image the engine perturbs L regions in order and records the classifier's score
after each step. All (image, step) inputs are built on the model's device with one
``torch.where`` per chunk straight into a reused buffer (no gathers, no host syncs), so the
cost is close to the N·(L+1) bare forward passes, and peak memory depends on ``batch_size``,
not on ``steps``. Pure torch; knows nothing of Lightning.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from heatmapbench import registry
from heatmapbench.accel.fusion import fused
from heatmapbench.perturbation.curves import aopc
from heatmapbench.perturbation import incremental as inc
from heatmapbench.perturbation.perturbations import Perturbation, PixelSpace
from heatmapbench.perturbation.regions import ORDERS, REGION_MODES, max_regions, select_regions
from heatmapbench.accel.layout import check_layout, fast_model, to_layout
from heatmapbench.accel.precision import autocast, check_precision

__all__ = ["PerturbationResult", "region_perturbation", "eval_mode", "auto_batch_size", "SCORES",
           "AUTO_BATCH_BYTES", "AUTO_BATCH_DEVICE"]

SCORES = ("logit", "probability")

#: What the automatic batch size aims at on a CPU: the bytes of the largest tensor of one forward
#: pass (the input or a module's output). A forward whose activations stay near the cache scores
#: far more images per second than one that spills them (``benches/bench_runtime.py`` part (e)
#: measures it; the docs' Results list the figures).
AUTO_BATCH_BYTES = 24 << 20
#: The automatic batch size elsewhere (GPUs want large batches; 512 is what
#: ``benches/bench_gpu_protocol.py`` measured best across its networks).
AUTO_BATCH_DEVICE = 512


#: Bytes of perturbed inputs one chunk may hold when a perturbation asks for chunks larger than
#: the forward batch (:attr:`~heatmapbench.perturbation.Perturbation.fill_chunk`).
FILL_CHUNK_BYTES = 192 << 20


def auto_batch_size(forward, x: Tensor, model: nn.Module) -> int:
    """Inputs per forward pass so that its largest tensor stays near :data:`AUTO_BATCH_BYTES` (CPU).

    ``forward`` runs ``model`` on one image of ``x`` as the engine does (layout, precision),
    with a hook on every module measuring its output; the largest tensor per image (the input
    included) sets the batch. Other devices get :data:`AUTO_BATCH_DEVICE`, without a probe. Speed
    and memory only: the scores change by float reassociation inside the kernels at most.
    """
    if x.device.type != "cpu":
        return AUTO_BATCH_DEVICE
    largest = [x[:1].numel() * x.element_size()]

    def hook(module, inputs, output):
        if isinstance(output, Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        forward(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return max(1, AUTO_BATCH_BYTES // largest[0])


@dataclass
class PerturbationResult:
    """What :func:`region_perturbation` measured.

    Attributes
    ----------
    curves : (R, B, L+1)
        f(x⁽⁰⁾) − f(x⁽ᵏ⁾) for k = 0..L; column 0 is zero.
    scores : (R, B, L+1)
        f(x⁽ᵏ⁾), the raw score of the target class (logit or probability).
    aopc : (R, B)
        1/(L+1) Σ_{k=0..L} curves (paper eq. 11, before averaging over images).
    order : (R, B, L)
        The region perturbed at each step (see :mod:`heatmapbench.perturbation.regions`).
    target : (B,)
        The class scored (the predicted class unless given).
    settings : dict
        The arguments the result was computed with (order, perturbation, region size, …).
    """

    curves: Tensor
    scores: Tensor
    aopc: Tensor
    order: Tensor
    target: Tensor
    settings: dict

    @property
    def steps(self) -> int:
        return self.curves.shape[-1] - 1


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own mode on exit, also on error."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.train(training)


def check_target_range(target: Tensor, num_classes: int) -> None:
    """Every class in ``target`` is below ``num_classes`` (the model's outputs)."""
    hi = int(target.max())
    if hi >= num_classes:
        raise ValueError(f"target holds class {hi}, outside the model's classes [0, {num_classes})")


def check_batch(x: Tensor, target: Tensor | None = None, num_classes: int | None = None) -> None:
    """A non-empty batch of finite images and, if given, integer targets in ``[0, num_classes)``.

    Cheap (one pass over ``x``), at the entry: NaN/inf in ``x`` would otherwise give NaN AOPC.
    """
    b = x.shape[0]
    if b == 0:
        raise ValueError("x is an empty batch (B = 0); pass at least one image")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf; check the data and its normalisation (std > 0) before evaluating")
    if target is None:
        return
    if not isinstance(target, Tensor) or target.shape != (b,) or target.is_floating_point():
        raise ValueError(f"target must be None or an integer tensor of shape ({b},)")
    if int(target.min()) < 0:
        raise ValueError(f"target holds class {int(target.min())}; classes are indices ≥ 0")
    if num_classes is not None:
        check_target_range(target, num_classes)


def _validate(x: Tensor, heatmap: Tensor, target: Tensor | None, region_size: int, steps: int,
              order: str, regions: str, score: str, repeats: int, batch_size: int | None,
              mean, std, value_range) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (B, C, H, W) tensor, got "
                         f"{getattr(x, 'shape', type(x))}")
    b, c, h, w = x.shape
    check_batch(x, target)
    if not isinstance(heatmap, Tensor) or heatmap.ndim != 3 or tuple(heatmap.shape) != (b, h, w):
        raise ValueError(
            f"heatmap must have shape (B, H, W) = {(b, h, w)} to match x {tuple(x.shape)}, got "
            f"{tuple(getattr(heatmap, 'shape', ()))}. Sum or pool a (B, C, H, W) attribution over "
            "channels first.")
    if not bool(torch.isfinite(heatmap).all()):
        raise ValueError("heatmap contains NaN or inf; fix the explainer or replace them "
                         "(e.g. torch.nan_to_num) before evaluating")
    if order not in ORDERS:
        raise ValueError(f"Unknown order {order!r}; use one of {ORDERS}")
    if regions not in REGION_MODES:
        raise ValueError(f"Unknown regions {regions!r}; use one of {REGION_MODES}")
    if score not in SCORES:
        raise ValueError(f"Unknown score {score!r}; use one of {SCORES}")
    if isinstance(region_size, bool) or not isinstance(region_size, int) or region_size < 1:
        raise ValueError(f"region_size must be an int ≥ 1, got {region_size!r}")
    if region_size > min(h, w):
        raise ValueError(f"region_size={region_size} is larger than the image ({h}x{w}); "
                         "use a region_size no larger than min(H, W)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int ≥ 1, got {steps!r}")
    most = max_regions(h, w, region_size, regions)
    if steps > most:
        raise ValueError(f"steps={steps} exceeds the {most} {regions} regions of size {region_size} "
                         f"in a {h}x{w} image; use steps ≤ {most} or a smaller region_size")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int ≥ 1, got {repeats!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int ≥ 1, got {batch_size!r}")
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and len(v) not in (1, c):
            raise ValueError(f"{name} needs 1 or C={c} values (one per channel), got {len(v)}")
    if std is not None and any(float(s) <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
        raise ValueError(f"value_range must be (lo, hi) with lo < hi, got {value_range}")


def _segments(start: int, stop: int, b: int) -> Iterator[tuple[int, int, int, int]]:
    """Split flat step-major pairs [start, stop) (pair i = step i // B, image i % B) into blocks
    (k0, k1, b0, b1) that are either one step over an image range or whole steps."""
    i = start
    while i < stop:
        k, j = divmod(i, b)
        if j or stop - i < b:  # a partial step
            j1 = min(b, j + stop - i)
            yield k, k + 1, j, j1
            i += j1 - j
        else:  # whole steps
            nk = (stop - i) // b
            yield k, k + nk, 0, b
            i += nk * b


def _broadcast_c(v: Sequence[float] | None, c: int) -> list[float] | None:
    return None if v is None else [float(t) for t in v] * (c if len(v) == 1 else 1)


def region_perturbation(
    model: nn.Module,
    x: Tensor,
    heatmap: Tensor,
    *,
    target: Tensor | None = None,
    region_size: int = 9,
    steps: int = 100,
    order: str = "morf",
    perturbation: str | Perturbation = "uniform",
    regions: str = "grid",
    score: str = "logit",
    repeats: int = 1,
    seed: int = 0,
    batch_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    precision: str = "fp32",
    layout: str = "auto",
    fuse: bool = True,
    incremental: str = "off",
    progress: Callable[[int], Any] | None = None,
) -> PerturbationResult:
    """Perturb regions in heatmap order and record the score (Samek et al., Sec. 3, eq. 11).

    x⁽⁰⁾ = x and x⁽ᵏ⁾ = g(x⁽ᵏ⁻¹⁾, r_k): the pixels of region r_k are replaced by the
    perturbation's values. The regions do not overlap, so a pixel is perturbed once.

    Parameters
    ----------
    model : classifier returning (N, classes) scores for (N, C, H, W) inputs. Run in eval mode
        under ``torch.inference_mode()``; each submodule's mode, and every parameter and buffer,
        is restored afterwards.
    x : (B, C, H, W) images in model space (what ``model`` is fed).
    heatmap : (B, H, W) pixel relevances; finite.
    target : (B,) classes to score; default the predicted class of x (no labels needed).
    region_size : P, the side of a square region (paper: 9).
    steps : L, the number of regions perturbed (paper: 100).
    order : ``"morf"`` (most relevant first), ``"lerf"`` (least relevant first, eq. 12) or
        ``"random"`` (seeded, its own order per image and repeat).
    perturbation : a name registered in ``conf/perturbation/`` (uniform, mean, constant, blur,
        road) or a :class:`~heatmapbench.perturbation.Perturbation` instance.
    regions : ``"grid"`` — non-overlapping P×P tiles from the top-left corner, scored by the
        sum of the heatmap inside; when P does not divide H or W the last row/column of tiles
        is cropped at the border and those smaller tiles compete on their (smaller) sums.
        ``"sliding"`` — every P×P window at stride 1, scored by its sum, taken in order and
        skipping any window that overlaps one already perturbed (greedy, batched over images).
    score : ``"logit"`` (the paper: pre-softmax) or ``"probability"`` (softmax).
    repeats : R, independent repeats (paper: 10): new random draws and random orders.
    seed : the seed of every random draw; the same seed gives bit-identical results.
        Random orders use ``torch.Generator(device).manual_seed(2·seed)`` (one
        ``rand(R, B, N)`` draw); perturbations use a second generator seeded with ``2·seed + 1``,
        on which repeat r calls ``prepare`` after repeats 0..r-1.
    batch_size : inputs per forward pass; default (None) chosen by :func:`auto_batch_size` from the
        model's largest activation (cache-sized chunks on a CPU; 512 on a GPU). Peak memory is set by it, not by
        ``steps``; the scores change with it by float reassociation at most.
    mean, std : per-channel normalisation (model = (px − mean)/std); default identity.
    value_range : (lo, hi) of pixels, e.g. (0, 1) or (0, 255). The paper's U(0, 1) noise is drawn
        in [0, 1]-scaled intensity and mapped to this range.
    precision : ``"fp32"`` (default, the reference: IEEE float32, TF32 off on CUDA), ``"tf32"``
        (CUDA only), ``"bf16"`` or ``"fp16"`` (CUDA only): the forward passes run under
        ``torch.autocast`` or the float32 math asked for; scores are float32. Perturbed inputs are
        built in ``x``'s dtype either way (see :mod:`heatmapbench.accel.precision`).
    layout : ``"auto"`` (channels_last for models with 2-D convolutions: the same results up
        to float reassociation, faster on oneDNN/cuDNN), ``"channels_last"`` or ``"contiguous"``.
    fuse : run the forwards on :func:`heatmapbench.accel.fusion.fused` ``(model)``: BatchNorm and zero
        padding folded into the convolutions (the same function up to float reassociation; the
        model itself where nothing folds, or it has hooks or cannot be traced).
    incremental : ``"off"`` (default), ``"on"`` or ``"auto"``: walk the curves with incremental
        forwards (:mod:`heatmapbench.perturbation.incremental`: each step recomputes only the
        windows its new region reaches; the same scores up to float reassociation). ``on`` raises
        where the model or perturbation does not allow it; ``auto`` uses it where a one-time probe
        per model measures it faster. ``settings["incremental"]`` says what ran and why.
    progress : called as ``progress(n)`` after every forward pass with its ``n`` inputs.

    Returns
    -------
    PerturbationResult with ``curves``/``scores`` (R, B, L+1), ``aopc`` (R, B), ``order`` (R, B, L).

    Raises
    ------
    ValueError / TypeError for bad input (an empty batch, NaN/inf in ``x``, …) before any forward
    pass; a ``target`` beyond the model's classes after the clean forward, before any perturbed one.
    """
    _validate(x, heatmap, target, region_size, steps, order, regions, score, repeats, batch_size,
              mean, std, value_range)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int ≥ 0, got {seed!r}")
    check_precision(precision, x.device)
    check_layout(layout)
    pert = registry.resolve("perturbation", perturbation, Perturbation)
    if incremental not in inc.MODES:
        raise ValueError(f"incremental={incremental!r} is not one of {inc.MODES}")
    if incremental == "on" and inc.local_step_reason(pert) is not None:
        raise ValueError(f"incremental=on: {inc.local_step_reason(pert)}; use incremental=auto or off")
    b, c, h, w = x.shape
    dev = x.device
    x = x.detach()
    space = PixelSpace.build(c, _broadcast_c(mean, c), _broadcast_c(std, c), value_range, dev, x.dtype)
    g_order = torch.Generator(device=dev).manual_seed(2 * seed)
    g_pert = torch.Generator(device=dev).manual_seed(2 * seed + 1)
    order_idx, pixel_step = select_regions(heatmap.detach().to(dev), region_size=region_size,
                                           steps=steps, order=order, regions=regions,
                                           repeats=repeats, generator=g_order)
    n_pairs = (steps + 1) * b  # step-major: pair i is (step i // B, image i % B)
    # Masks are 0/1 weights in a float type: clamp(k + 1 − step, 0, 1) = [step ≤ k].
    wdt = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    ks1 = torch.arange(1, steps + 2, device=dev, dtype=wdt).view(-1, 1, 1, 1, 1)  # (L+1,1,1,1,1) k+1
    pixel_step_int = pixel_step
    pixel_step = pixel_step.to(wdt)

    @contextlib.contextmanager
    def context() -> Iterator[None]:  # the forwards' math
        with torch.inference_mode(), autocast(precision, dev):
            yield

    def forward(inp: Tensor, count: bool = True) -> Tensor:  # (n, classes) scores: logits or probabilities
        with context():
            out = net(to_layout(inp, nhwc))
        if progress is not None and count:
            progress(int(inp.shape[0]))
        return finish(out)

    def finish(out: Tensor) -> Tensor:
        if out.ndim != 2:
            raise ValueError(f"model must return (N, classes) scores, got shape {tuple(out.shape)}")
        if precision != "fp32":
            out = out.float()
        return out.softmax(dim=1) if score == "probability" else out

    with eval_mode(model), fast_model(model, layout) as nhwc, torch.no_grad():
        net = fused(model, to_layout(x[:1], nhwc)) if fuse else model
        bs = auto_batch_size(forward, x, net) if batch_size is None else batch_size
        # Step 0: the clean images, which also fix the default target.
        logits0 = torch.cat([forward(x[i:i + bs]) for i in range(0, b, bs)])
        if target is not None:  # the class count is known from here on, before any perturbed forward
            check_target_range(target, logits0.shape[1])
        tgt = logits0.argmax(dim=1) if target is None else target.to(dev)
        f0 = logits0.gather(1, tgt[:, None]).squeeze(1)  # (B,)
        tgt_col = tgt.repeat(steps + 1).unsqueeze(1)  # (n_pairs, 1) step-major
        scores = torch.empty(repeats, steps + 1, b, device=dev, dtype=f0.dtype)  # step-major
        scores[:, 0] = f0
        # Inputs are built in chunks of cs image-steps and scored in forward batches of bs within
        # them; cs = bs unless the perturbation builds more cheaply in larger chunks (ROAD's
        # solves), capped so that the chunk's inputs stay within FILL_CHUNK_BYTES.
        cs, wanted = bs, getattr(pert, "fill_chunk", None)  # duck-typed perturbations may lack it
        if wanted is not None:
            per_input = c * h * w * x.element_size()
            cs = max(bs, min(wanted, FILL_CHUNK_BYTES // per_input) // bs * bs)  # whole batches
        buf = torch.empty((min(cs, n_pairs - b), c, h, w), device=dev, dtype=x.dtype)
        # The chunks, and their views into buf, are the same for every repeat: build them once
        # (the loop below then costs a few tensor calls per chunk).
        plan = []
        for s in range(b, n_pairs, cs):
            e = min(s + cs, n_pairs)
            pos, segs = 0, []
            for k0, k1, b0, b1 in _segments(s, e, b):
                n = (k1 - k0) * (b1 - b0)
                segs.append((k0, k1, b0, b1, buf[pos:pos + n].view(k1 - k0, b1 - b0, c, h, w), ks1[k0:k1]))
                pos += n
            plan.append((buf[:pos], segs, tgt_col[s:e], s, e))
        cast = wdt != x.dtype
        xs = x.unsqueeze(0)  # (1, B, C, H, W)
        walker, ran = None, "full (incremental=off)"
        for r in range(repeats):
            state = pert.prepare(x, space, g_pert).contiguous().unsqueeze(0)  # (1, B, C, H, W)
            if r == 0 and incremental != "off":  # decided on the first repeat's draw, once per model
                walker, ran = inc.setup(incremental, net, x, pert, state[0], pixel_step_int[0], steps=steps,
                                        region_size=region_size, target=tgt, batch_size=bs, score_dtype=f0.dtype,
                                        context=context, finish=finish, progress=progress,
                                        forward_full=lambda inp: forward(inp, count=False))
            if walker is not None:
                walker.run(state[0], pixel_step_int[r], scores[r], tgt)
                continue
            walk = pert.walk(x, state[0], pixel_step_int[r], steps)
            ps = pixel_step[r].unsqueeze(1).unsqueeze(0)  # (1, B, 1, H, W)
            col = scores[r].view(-1, 1)
            for inp, segs, tcol, s, e in plan:
                for k0, k1, b0, b1, out, kk in segs:
                    if walk is not None:  # keeps each image's input itself: no mask needed
                        walk.fill(k0, k1, b0, b1, out)
                        continue
                    mask = (kk - ps[:, b0:b1]).clamp_(0, 1)  # (K, Bs, 1, H, W): 1 where removed
                    if cast:
                        mask = mask.to(x.dtype)
                    pert.apply(xs[:, b0:b1], mask, state[:, b0:b1], out=out)
                for q in range(0, e - s, bs):
                    torch.gather(forward(inp[q:q + bs]), 1, tcol[q:q + bs], out=col[s + q:min(s + q + bs, e)])
    scores = scores.transpose(1, 2).contiguous()  # (R, B, L+1)
    curves = scores[..., :1] - scores
    settings = dict(region_size=region_size, steps=steps, order=order, perturbation=repr(pert),
                    regions=regions, score=score, repeats=repeats, seed=seed, batch_size=bs,
                    mean=mean, std=std, value_range=tuple(value_range), precision=precision,
                    layout=layout, fuse=fuse, incremental=ran)
    return PerturbationResult(curves=curves, scores=scores, aopc=aopc(curves),
                              order=order_idx, target=tgt, settings=settings)
