"""The named perturbations: each name is a class and its parameters, the catalogue in Python.

``PERTURBATIONS["road"]()`` builds :class:`~heatmapbench.perturbation.Road` with its own defaults,
keyword arguments override them (``PERTURBATIONS["road"](noise=0.05)``).
:func:`heatmapbench.perturbation.get_perturbation` looks names up here (after the user's own, see
:mod:`heatmapbench.registry`); nothing is read from disk. Every perturbation of the paper is its
class's defaults, so the entries bind nothing, and the YAML files ``conf/perturbation/<name>.yaml``
(``perturbation=<name>``) name the class over a schema read from its signature; a test keeps each
equal to its entry here.
"""

from __future__ import annotations

from functools import partial

from heatmapbench.perturbation.perturbations import Blur, Constant, Mean, Uniform
from heatmapbench.perturbation.road import Road

__all__ = ["PERTURBATIONS"]

#: name -> the perturbation's class with its parameters bound (``PERTURBATIONS[name]()`` builds it).
PERTURBATIONS: dict[str, partial] = {
    # The paper: independent U(0,1) per pixel and channel in [0,1]-scaled pixel space.
    "uniform": partial(Uniform),
    # Per-channel dataset mean (the data's mean, 0 in model space, unless pixel_mean is given).
    "mean": partial(Mean),
    # A constant in [0,1]-scaled intensity (0 = bottom of value_range).
    "constant": partial(Constant),
    # Gaussian blur, sigma = 3 (paper appendix); borders replicated.
    "blur": partial(Blur),
    # ROAD noisy linear imputation (Rong et al. 2022): 8 neighbours (1/6 sides, 1/12 diagonals) + noise.
    "road": partial(Road),
}
