"""How forward and backward passes run fast without changing what they compute.

* :mod:`.fusion`: BatchNorm and zero padding folded into the convolutions of an eval-mode graph;
* :mod:`.layout`: channels_last memory layout for 2-D convolutions;
* :mod:`.precision`: float32, bf16, fp16 and TF32 passes.

Each is opt-in per call (or on by default and switchable off, fusion) and undone on exit; the
user's model is left exactly as it was.
"""

from heatmapbench.accel.fusion import fused, fusion
from heatmapbench.accel.layout import LAYOUTS, channels_last, fast_model, to_layout
from heatmapbench.accel.precision import CUDA_ONLY, PRECISIONS, autocast, check_precision

__all__ = ["CUDA_ONLY", "LAYOUTS", "PRECISIONS", "autocast", "channels_last", "check_precision", "fast_model",
           "fused", "fusion", "to_layout"]
