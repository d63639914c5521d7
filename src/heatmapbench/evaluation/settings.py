"""What an evaluation scores and how: :class:`EvaluationSettings` (the paper's defaults).

The one declaration of these defaults: the ``evaluation`` config group uses this class as its
schema, and its YAML files set only what differs. Errors name the argument (``steps=0 is
invalid``); the commands add the config group (``evaluation.steps=0 is invalid``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from heatmapbench.accel.layout import check_layout
from heatmapbench.accel.precision import check_precision
from heatmapbench.metrics.summary import N_BOOT
from heatmapbench.perturbation.incremental import MODES as INCREMENTAL_MODES
from heatmapbench.perturbation.regions import REGION_MODES
from heatmapbench.registry import available

__all__ = ["DEFAULT_EXPLAINERS", "EvaluationSettings"]

DEFAULT_EXPLAINERS = ["random", "sensitivity_l2", "deconvnet_l2", "lrp_epsilon_0.01", "lrp_alpha2_beta1"]


@dataclass
class EvaluationSettings:
    """What is scored and how (paper Sec. 3 defaults: 9×9 grid regions, L = 100, uniform noise).

    Also the typed schema of the ``evaluation`` config group: a wrong key, type or value fails
    before any work starts.

    Parameters
    ----------
    explainers
        Names of the explainers to compare: the catalogue's (:data:`heatmapbench.explain.presets.EXPLAINERS`)
        or the user's own (:mod:`heatmapbench.registry`).
    region_size, steps, regions, score
        Passed to :func:`~heatmapbench.perturbation.region_perturbation`.
    orders
        Orders run for every explainer: ``morf`` (always), ``lerf`` (adds ABPC).
    repeats
        Repeats of each explainer's curve (new perturbation draws).
    random_repeats
        Repeats of the random-ordering baseline (paper: 10).
    seed
        Seed of every draw.
    batch_size
        Inputs per forward pass inside the engine; null (default) chooses it from the model's
        largest activation (:func:`~heatmapbench.perturbation.engine.auto_batch_size`: cache-sized
        chunks on a CPU). Speed and memory only, never the scores.
    complexity
        Also measure PNG/JPEG-90 size and entropy of the heatmaps (paper Table I).
    n_boot
        Bootstrap resamples of the images behind every confidence interval and paired test.
    precision
        ``fp32`` (the reference: IEEE float32, also on CUDA), ``tf32`` (CUDA only: TF32
        convolutions and matrix products), ``bf16`` or ``fp16`` (CUDA only): the math of the
        explainers' and the engine's passes (:mod:`heatmapbench.accel`); AOPC moves with it.
    layout
        ``auto`` (channels_last for 2-D convnets: the same numbers up to float reassociation,
        faster), ``channels_last`` or ``contiguous``.
    fuse
        Run the engine's forwards and the gradient explainers on the model with BatchNorm and
        symmetric zero padding folded into its convolutions (:mod:`heatmapbench.accel.fusion`: the same
        numbers up to float reassociation, faster); LRP always runs on the model itself.
    incremental
        ``off`` (default), ``on`` or ``auto``: walk the perturbation curves with incremental
        forwards (:mod:`heatmapbench.perturbation.incremental`: each step recomputes only what
        its new region reaches; the same numbers up to float reassociation). ``on`` fails where
        the model or perturbation does not allow them; ``auto`` uses them per model where a
        one-time timing probe measures them faster (rank 0's verdict in every process of a run),
        so its choice, and the last bits of the numbers, may differ between runs (use ``on`` or
        ``off`` where runs must agree bit for bit). The run's ``incremental`` tag and the progress
        line say what ran.
    """

    explainers: list[str] = field(default_factory=lambda: list(DEFAULT_EXPLAINERS))
    region_size: int = 9
    steps: int = 100
    orders: list[str] = field(default_factory=lambda: ["morf"])
    regions: str = "grid"
    score: str = "logit"
    repeats: int = 1
    random_repeats: int = 10
    seed: int = 0
    batch_size: Optional[int] = None
    complexity: bool = True
    n_boot: int = N_BOOT
    precision: str = "fp32"
    layout: str = "auto"
    fuse: bool = True
    incremental: str = "off"

    def __post_init__(self) -> None:
        self.orders = list(self.orders)
        self.explainers = [self.explainers] if isinstance(self.explainers, str) else list(self.explainers)
        for key, values in (("orders", self.orders), ("explainers", self.explainers)):
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise ValueError(f"{key}=[{','.join(values)}] is invalid: {', '.join(twice)} appears more "
                                  f"than once; name each once")
        bad = [o for o in self.orders if o not in ("morf", "lerf")]
        if bad or "morf" not in self.orders:
            raise ValueError(f"orders={self.orders} is invalid: it must contain 'morf' and may add 'lerf'")
        for key in ("region_size", "steps", "repeats", "random_repeats", "n_boot"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key}={getattr(self, key)} is invalid: must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is invalid: must be >= 1 or null")
        if self.regions not in REGION_MODES:
            raise ValueError(f"regions={self.regions!r} is invalid: choose one of {list(REGION_MODES)}")
        if self.score not in ("logit", "probability"):
            raise ValueError(f"score={self.score!r} is invalid: choose logit or probability")
        check_precision(self.precision)
        check_layout(self.layout)
        if self.incremental not in INCREMENTAL_MODES:
            raise ValueError(f"incremental={self.incremental!r} is invalid: choose one of {list(INCREMENTAL_MODES)}")
        if not self.explainers:
            raise ValueError("explainers=[] is invalid: name at least one explainer")
        known = available("explainer")
        unknown = [n for n in self.explainers if n not in known]
        if unknown:
            raise ValueError(f"explainers={self.explainers} is invalid: unknown explainer(s) {unknown}; known: "
                             f"{', '.join(known)}")

    def engine_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``region_perturbation`` that these settings fix."""
        return {"region_size": self.region_size, "steps": self.steps, "regions": self.regions,
                "score": self.score, "batch_size": self.batch_size, "precision": self.precision,
                "layout": self.layout, "fuse": self.fuse, "incremental": self.incremental}
