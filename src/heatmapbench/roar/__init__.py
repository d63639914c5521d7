"""ROAR and KAR (Hooker et al., NeurIPS 2019): remove (or keep) what a heatmap marks, retrain, measure.

* :mod:`~heatmapbench.roar.removal`: the removal masks (top-t or bottom-t pixels of each heatmap) and the
  modified images (the per-channel training mean, Hooker's choice, or any engine perturbation);
* :mod:`~heatmapbench.roar.retrain`: heatmaps of whole datasets in batches, the retraining jobs and one
  retraining through the Lightning trainer with a fixed recipe and seed.
"""

from heatmapbench.roar.removal import METHODS, removal_mask, remove
from heatmapbench.roar.retrain import Job, dataset_heatmaps, jobs, retrain

__all__ = ["METHODS", "Job", "dataset_heatmaps", "jobs", "removal_mask", "remove", "retrain"]
