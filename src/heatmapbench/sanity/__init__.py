"""Is the heatmap real? Sanity checks of explainers beyond region perturbation.

* :mod:`~heatmapbench.sanity.randomisation` and :mod:`~heatmapbench.sanity.mprt`: the model-parameter
  randomisation test (Adebayo et al., NeurIPS 2018), cascading and independent;
* :mod:`~heatmapbench.sanity.similarity`: the heatmap similarities it reports (Spearman of |h|, SSIM,
  top-k intersection).
"""

from heatmapbench.sanity.mprt import MPRTResult, model_randomisation
from heatmapbench.sanity.randomisation import MODES, RandomisationStep, randomisable_layers, randomised_copy, schedule
from heatmapbench.sanity.similarity import SIMILARITIES, spearman_abs, ssim, topk_intersection

__all__ = ["MODES", "MPRTResult", "RandomisationStep", "SIMILARITIES", "model_randomisation", "randomisable_layers",
           "randomised_copy", "schedule", "spearman_abs", "ssim", "topk_intersection"]
