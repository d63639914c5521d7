"""How the figures and tables of an evaluation look and label things; shared by every figure of the package.

:data:`STYLE` is the matplotlib style all figures draw under (the evaluation's, the report's, ROAR's and
the sanity checks'); the labels say how the random ordering, the settings and an epoch read.
"""

from __future__ import annotations

__all__ = ["RANDOM_ORDERING_LABEL", "STYLE", "epoch_label", "settings_title"]

#: Figures: paper-ready resolution and fonts (every figure of the package draws under it).
STYLE = {"figure.dpi": 150, "savefig.dpi": 150, "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
         "legend.fontsize": 9, "xtick.labelsize": 10, "ytick.labelsize": 10, "savefig.bbox": "tight"}
#: How the random-ordering baseline is labelled in tables and figures (it is not the ``random`` explainer).
RANDOM_ORDERING_LABEL = "random ordering"


def settings_title(settings, perturbation, images: int, prefix: str = "") -> str:
    """``"<prefix>MoRF · 9×9 grid regions · L=100 · uniform · 64 images"``: the settings a figure shows."""
    name = type(perturbation).__name__.lower() if perturbation is not None else "?"
    parts = [f"{settings.region_size}×{settings.region_size} {settings.regions} regions", f"L={settings.steps}",
             f"perturbation: {name}", f"{settings.score}", f"{images} images"]
    return prefix + " · ".join(parts)


def epoch_label(epoch: int) -> str:
    """How an evaluation's epoch reads in titles and on axes: epoch 0 is the untrained network."""
    return "before training" if int(epoch) == 0 else f"after epoch {int(epoch)}"

