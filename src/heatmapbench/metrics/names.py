"""The name of every metric heatmapbench logs to MLflow, defined once.

The training callback, ``heatmapbench-evaluate``, the report and the tests build and parse
metric names only through this module. There are three kinds of name:

**Explainer metrics** ``<measure>/<explainer>``, one per heatmap method, e.g.
``aopc_rel/lrp_epsilon_0.01``. The measures (:data:`MEASURES`):

* ``aopc``: MoRF AOPC (paper eq. 11) in the units of the score (logits by default);
* ``aopc_rel``: AOPC minus the random *ordering*'s AOPC on the same images (paper Fig. 4);
* ``aopc_norm``: AOPC divided by the mean clean score f(x⁽⁰⁾) of the same images, so that a
  network whose logits merely grow does not look better;
* ``aopc_lerf``, ``abpc``: LeRF AOPC and AOPC_MoRF − AOPC_LeRF (when LeRF was run);
* ``complexity_png``, ``complexity_jpeg``, ``complexity_entropy``: heatmap complexity (Table I);
* ``beats_random``, ``p_best``: the fraction of images on which the explainer beats the random
  ordering, and the bootstrap probability that it has the best mean; for the LeRF and ABPC
  rankings with the order appended (``beats_random_lerf``, ``p_best_abpc``; :func:`ranking_metric`).

A 95% confidence interval's bounds append ``_lo`` / ``_hi`` to the measure:
``aopc_rel_lo/<explainer>``. The explainer called ``random`` is the random *heatmap*, a method
like any other; it is not the random-ordering baseline.

**Correlations** with accuracy across training epochs,
``corr_<method>/<measure>/<explainer>`` (``corr_pearson/aopc_rel/lrp_epsilon_0.01``), bounds as
``corr_pearson_lo/aopc_rel/<explainer>``.

**Reliability** of the ranking within one evaluation under ``reliability/``
(:func:`reliability_metric`): ``reliability/krippendorff_alpha/<order>`` (and ``_lo``/``_hi``),
``reliability/morf_lerf_tau``. Across the runs of a sweep (heatmapbench-report's summary run):
``reliability/kendall_w`` (and ``_lo``/``_hi``, ``reliability/kendall_w_p``), ``reliability/tau_mean``,
``reliability/tau_min`` and per explainer ``reliability/cronbach_alpha/<explainer>``
(:func:`explainer_reliability_metric`).

**Sanity checks** under ``sanity/`` (:func:`sanity_metric`): ``sanity/mprt/<explainer>``, the mean
Spearman correlation of |heatmap| with the trained model's after the whole network is randomised
(cascading; Adebayo et al. 2018; lower is better), ``sanity/mprt_<measure>/<explainer>`` the same for
each similarity measure and ``sanity/mprt_independent_<measure>/<explainer>`` its mean over the layers
randomised one at a time (bounds ``_lo``/``_hi`` as above).

**ROAR/KAR** (Hooker et al. 2019) on ``heatmapbench-roar``'s parent run (:func:`roar_metric`):
``roar/<explainer>`` and ``kar/<explainer>``, the mean test accuracy after retraining over the removal
fractions and seeds (ROAR: lower is better; KAR: higher), ``unmodified/accuracy`` without removal.

**Bookkeeping** under ``eval/`` (never an explainer): :data:`SECONDS`, :data:`IMAGES`, :data:`IMAGES_REUSED`,
:data:`ACCURACY`, :data:`SUBSET_ACCURACY`, :data:`EPOCH`, and the random *ordering* baseline
under ``eval/random_ordering/``: ``eval/random_ordering/aopc`` (:func:`random_ordering_metric`)
and its correlations ``eval/random_ordering/corr_pearson/aopc``
(:func:`random_ordering_correlation`).

Lightning's own metrics (``val/acc``, ``test/acc``, …) keep their names: :data:`VAL_ACC`,
:data:`TEST_ACC`.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

__all__ = [
    "AOPC", "AOPC_REL", "AOPC_NORM", "AOPC_LERF", "ABPC", "COMPLEXITY_PNG", "COMPLEXITY_JPEG",
    "COMPLEXITY_ENTROPY", "MEASURES", "COMPLEXITY", "BOUNDS", "CORRELATION_METHODS", "CORRELATED_MEASURES",
    "NAMESPACE", "SECONDS", "IMAGES", "IMAGES_REUSED", "ACCURACY", "SUBSET_ACCURACY", "EPOCH", "RANDOM_ORDERING", "VAL_ACC",
    "TEST_ACC", "ExplainerMetric", "explainer_metric", "parse_explainer_metric", "correlation_metric",
    "parse_correlation_metric", "random_ordering_metric", "random_ordering_correlation", "explainers_in",
    "MEASURE_LABELS", "BEATS_RANDOM", "P_BEST", "RANKING_ORDERS", "RELIABILITY", "ranking_metric",
    "reliability_metric", "explainer_reliability_metric", "SANITY", "sanity_metric", "roar_metric",
]

# -- explainer measures ------------------------------------------------------------------------
AOPC = "aopc"
AOPC_REL = "aopc_rel"
AOPC_NORM = "aopc_norm"
AOPC_LERF = "aopc_lerf"
ABPC = "abpc"
COMPLEXITY_PNG = "complexity_png"
COMPLEXITY_JPEG = "complexity_jpeg"
COMPLEXITY_ENTROPY = "complexity_entropy"
#: Complexity measure of each key of ``Evaluation.complexity`` (``png``, ``jpeg``, ``entropy``).
COMPLEXITY = {"png": COMPLEXITY_PNG, "jpeg": COMPLEXITY_JPEG, "entropy": COMPLEXITY_ENTROPY}
BEATS_RANDOM = "beats_random"
P_BEST = "p_best"
#: Orders an explainer ranking is made by (see :mod:`heatmapbench.evaluation.reliability`).
RANKING_ORDERS = ("morf", "lerf", "abpc")
_RANKING = tuple(f"{m}{'' if o == 'morf' else '_' + o}" for m in (BEATS_RANDOM, P_BEST) for o in RANKING_ORDERS)
MEASURES = (AOPC, AOPC_REL, AOPC_NORM, AOPC_LERF, ABPC, COMPLEXITY_PNG, COMPLEXITY_JPEG, COMPLEXITY_ENTROPY,
            *_RANKING)
#: Bounds of a 95% confidence interval, appended to a measure or a correlation method.
BOUNDS = ("lo", "hi")
#: How a measure reads on an axis or in a table header.
MEASURE_LABELS = {AOPC: "AOPC (MoRF, raw)", AOPC_REL: "AOPC relative to random ordering",
                  AOPC_NORM: "AOPC / f(x⁽⁰⁾)", AOPC_LERF: "AOPC (LeRF)", ABPC: "ABPC",
                  COMPLEXITY_PNG: "PNG bytes", COMPLEXITY_JPEG: "JPEG-90 bytes", COMPLEXITY_ENTROPY: "entropy"}

# -- correlations with accuracy across epochs ------------------------------------------------------
CORRELATION_METHODS = ("pearson", "spearman")
#: Measures correlated with accuracy, the one the random ordering does not share first.
CORRELATED_MEASURES = (AOPC_REL, AOPC_NORM, AOPC)

# -- bookkeeping -------------------------------------------------------------------------------
NAMESPACE = "eval"
SECONDS = f"{NAMESPACE}/seconds"  #: wall time of the evaluation (the callback: of this epoch's)
IMAGES = f"{NAMESPACE}/images"  #: images evaluated
IMAGES_REUSED = f"{NAMESPACE}/images_reused"  #: of those, images a resumed evaluation kept from before it was stopped
ACCURACY = f"{NAMESPACE}/accuracy"  #: accuracy the AOPC is compared with (callback: val/acc; evaluate: on its images)
SUBSET_ACCURACY = f"{NAMESPACE}/subset_accuracy"  #: accuracy on the callback's evaluation subset
EPOCH = f"{NAMESPACE}/epoch"  #: epochs of training behind the evaluated weights (0: before training)
RANDOM_ORDERING = f"{NAMESPACE}/random_ordering"  #: prefix of the random-ordering baseline's metrics
RELIABILITY = "reliability"  #: prefix of the ranking's reliability statistics
SANITY = "sanity"  #: prefix of the sanity checks' metrics (model randomisation)

# -- Lightning's own ------------------------------------------------------------------------------
VAL_ACC = "val/acc"
TEST_ACC = "test/acc"


def _check_explainer(explainer: str) -> str:
    explainer = str(explainer)
    if not explainer or "/" in explainer:
        raise ValueError(f"explainer name {explainer!r} is invalid in a metric name: it must be non-empty "
                         "and contain no '/'")
    return explainer


def _with_bound(stem: str, bound: Optional[str]) -> str:
    if bound is None:
        return stem
    if bound not in BOUNDS:
        raise ValueError(f"bound={bound!r} is invalid: choose one of {BOUNDS} or None")
    return f"{stem}_{bound}"


def _check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r} is unknown; known: {', '.join(MEASURES)}")
    return measure


def _check_method(method: str) -> str:
    if method not in CORRELATION_METHODS:
        raise ValueError(f"correlation method={method!r} is unknown; known: {', '.join(CORRELATION_METHODS)}")
    return method


def explainer_metric(measure: str, explainer: str, bound: Optional[str] = None) -> str:
    """``<measure>[_lo|_hi]/<explainer>``, e.g. ``explainer_metric("aopc_rel", "gradient", "lo")``."""
    return f"{_with_bound(_check_measure(measure), bound)}/{_check_explainer(explainer)}"


class ExplainerMetric(NamedTuple):
    """A parsed explainer metric name."""

    measure: str
    explainer: str
    bound: Optional[str] = None


def _split_bound(stem: str) -> tuple[str, Optional[str]]:
    for bound in BOUNDS:
        if stem.endswith(f"_{bound}"):
            return stem[: -len(bound) - 1], bound
    return stem, None


def parse_explainer_metric(name: str) -> Optional[ExplainerMetric]:
    """The measure, explainer and bound of an explainer metric name; ``None`` for any other name."""
    stem, sep, explainer = name.partition("/")
    if not sep or not explainer or "/" in explainer:
        return None
    if stem in MEASURES:
        return ExplainerMetric(stem, explainer)
    measure, bound = _split_bound(stem)
    return ExplainerMetric(measure, explainer, bound) if bound and measure in MEASURES else None


def correlation_metric(method: str, measure: str, explainer: str, bound: Optional[str] = None) -> str:
    """``corr_<method>[_lo|_hi]/<measure>/<explainer>``: correlation of accuracy with ``measure``."""
    return f"corr_{_with_bound(_check_method(method), bound)}/{_check_measure(measure)}/{_check_explainer(explainer)}"


class CorrelationMetric(NamedTuple):
    """A parsed correlation metric name."""

    method: str
    measure: str
    explainer: str
    bound: Optional[str] = None


def parse_correlation_metric(name: str) -> Optional[CorrelationMetric]:
    """Method, measure, explainer and bound of ``corr_<method>/<measure>/<explainer>``; else ``None``."""
    parts = name.split("/")
    if len(parts) != 3 or not parts[0].startswith("corr_") or parts[1] not in MEASURES or not parts[2]:
        return None
    method, bound = _split_bound(parts[0][len("corr_"):])
    if method not in CORRELATION_METHODS:
        return None
    return CorrelationMetric(method, parts[1], parts[2], bound)


def random_ordering_metric(measure: str = AOPC, bound: Optional[str] = None) -> str:
    """``eval/random_ordering/<measure>[_lo|_hi]``: the random-ordering baseline (``aopc`` or ``aopc_norm``)."""
    if measure not in (AOPC, AOPC_NORM):
        raise ValueError(f"the random ordering has no {measure!r}; it has {AOPC!r} and {AOPC_NORM!r} "
                         f"(its {AOPC_REL!r} is 0 by definition)")
    return f"{RANDOM_ORDERING}/{_with_bound(measure, bound)}"


def random_ordering_correlation(method: str, measure: str = AOPC, bound: Optional[str] = None) -> str:
    """``eval/random_ordering/corr_<method>[_lo|_hi]/<measure>``: the baseline's correlation with accuracy."""
    random_ordering_metric(measure)  # validates the measure
    return f"{RANDOM_ORDERING}/corr_{_with_bound(_check_method(method), bound)}/{measure}"


def ranking_metric(measure: str, explainer: str, order: str = "morf") -> str:
    """``beats_random/<explainer>``, ``p_best_lerf/<explainer>``, …: an explainer's standing in a ranking."""
    if measure not in (BEATS_RANDOM, P_BEST):
        raise ValueError(f"measure={measure!r} is not a ranking measure; use {BEATS_RANDOM!r} or {P_BEST!r}")
    if order not in RANKING_ORDERS:
        raise ValueError(f"order={order!r} is invalid: choose one of {RANKING_ORDERS}")
    return explainer_metric(measure if order == "morf" else f"{measure}_{order}", explainer)


def reliability_metric(statistic: str, order: Optional[str] = None, bound: Optional[str] = None) -> str:
    """``reliability/<statistic>[_lo|_hi][/<order>]``, e.g. ``reliability/krippendorff_alpha/morf``."""
    if not statistic or "/" in statistic:
        raise ValueError(f"statistic={statistic!r} is invalid: non-empty, without '/'")
    if order is not None and order not in RANKING_ORDERS:
        raise ValueError(f"order={order!r} is invalid: choose one of {RANKING_ORDERS} or None")
    name = f"{RELIABILITY}/{_with_bound(statistic, bound)}"
    return name if order is None else f"{name}/{order}"


def explainer_reliability_metric(statistic: str, explainer: str, bound: Optional[str] = None) -> str:
    """``reliability/<statistic>[_lo|_hi]/<explainer>``, a per-explainer statistic across runs, e.g.
    ``reliability/cronbach_alpha/lrp_epsilon_0.01`` (logged by heatmapbench-report's summary run)."""
    if not statistic or "/" in statistic:
        raise ValueError(f"statistic={statistic!r} is invalid: non-empty, without '/'")
    return f"{RELIABILITY}/{_with_bound(statistic, bound)}/{_check_explainer(explainer)}"


def explainers_in(names: Iterable[str], measures: Iterable[str] = (AOPC_REL, AOPC)) -> list[str]:
    """Explainers that have a metric of one of ``measures`` among ``names``, in first-seen order.

    ``names`` may carry a prefix before the metric name (``metrics.aopc/x`` from
    ``mlflow.search_runs``): pass them with it stripped.
    """
    wanted = set(measures)
    found: dict[str, None] = {}
    for name in names:
        parsed = parse_explainer_metric(name)
        if parsed is not None and parsed.bound is None and parsed.measure in wanted:
            found.setdefault(parsed.explainer)
    return list(found)


def sanity_metric(test: str, explainer: str, bound: Optional[str] = None) -> str:
    """``sanity/<test>[_lo|_hi]/<explainer>``, e.g. ``sanity_metric("mprt", "gradient")``."""
    if not test or "/" in test:
        raise ValueError(f"sanity test name {test!r} is invalid: non-empty, without '/'")
    return f"{SANITY}/{_with_bound(test, bound)}/{_check_explainer(explainer)}"


def roar_metric(method: str, explainer: str) -> str:
    """``<method>/<explainer>`` of a ROAR parent run, e.g. ``roar_metric("roar", "sensitivity_l2")``."""
    if method not in ("roar", "kar", "unmodified"):
        raise ValueError(f"method={method!r} is invalid: roar, kar or unmodified")
    return f"{method}/{_check_explainer(explainer)}"
