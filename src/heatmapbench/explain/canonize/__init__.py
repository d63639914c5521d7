"""Canonization from the model's data flow: every operation that mixes values gets an LRP rule.

Module-based canonizers see only what a model registers; a functional ``x + y``, ``x.mean((2, 3))``
or ``F.relu`` is invisible to them, and a BatchNorm is paired with the layer *registered* before it
rather than the one that feeds it. Here the model is traced with :mod:`torch.fx` and the graph is
rewritten so that each value-mixing operation is an explicit module with a rule, while the forward
pass stays bit-identical (equal to rounding where fused attention is written out) and the user's
model object is never modified:

=====================================================  ============================================
operation in the traced graph                          rewritten as (LRP rule)
=====================================================  ============================================
conv / linear whose only consumer is an eval BatchNorm  :class:`FoldedLinear` (the conv's rule on the
                                                        folded affine map; forward = ``bn(conv(x))``)
a conv subclass that is a symmetric zero pad and one    a plain ``nn.ConvNd`` with the same
``F.convNd`` (TF "same" padding, EfficientNet-Lite)     Parameters and the pad in its padding
                                                        (:func:`.layers.plain_conv_twin`;
                                                        the same outputs, one pass fewer per rule)
BatchNorm fed by anything else                          :class:`BatchNormAffine` (epsilon rule)
``a + b``, ``a += b``, ``torch.add``, ``a - b``,        zennit :class:`~zennit.layer.Sum` of the
``x + constant``                                        stacked terms (proportional; a constant
                                                        absorbs its share like a bias)
``mean``/``sum`` over dims, functional average pools    :class:`Reduce` (proportional, a ``Sum``)
functional ReLU / ReLU6 / other activations             a fresh activation module per call (LRP:
                                                        relevance passes; deconvnet / guided
                                                        backprop: their ReLU rules)
``x * c``, ``x / c``, ``-x`` (c not from the input)     value kept, relevance passes unchanged
pooling by max, reshapes, ``cat``, slicing, indexing,   routing: the plain gradient moves relevance
flatten, dropout (eval), padding, nearest upsampling    without mixing it
(bi/tri)linear upsampling                               :class:`Reduce` (proportional: non-negative
                                                        weights)
LayerNorm / RMSNorm (modules or ``F.layer_norm`` /      :class:`NormStdConstant`: exact value, the
``F.rms_norm``)                                         std held constant (LXT's identity rule on
                                                        the normalisation), z-rule
``F.scaled_dot_product_attention``,                     written out: ``q @ k^T * scale``, ``softmax``,
``nn.MultiheadAttention`` (no masks)                    ``@ v``, projections as ``nn.Linear``
                                                        (:mod:`.transformers`)
``a * b``, ``a @ b`` of two activations (gates, SE,     refused; ``gates="constant"``: the sigmoid /
attention)                                              softmax factor held constant, relevance to
                                                        the other factor (CP-LRP; LXT for ViTs);
                                                        ``gates="uniform"``: half to each factor
                                                        (AttnLRP's uniform rule, softmax rule)
anything else that touches the input                   refused, naming op, graph node, source line
=====================================================  ============================================

The rewritten :class:`torch.fx.GraphModule` references the user's own leaf modules (their current
parameters, buffers and modes) and adds new modules only where it folds, wraps or makes a function a
module. :func:`canonize` caches it per model and rebuilds when the model's modules or tensors are
replaced; folded weights are recomputed from the current parameters when they change. The trace,
the cache and the refolding are :mod:`heatmapbench.fxgraph`'s, shared with inference fusion.

The package in layers, each importing only the ones above it:

* :mod:`.layers`: the modules and functions the rewritten graph calls (folded conv/linear,
  BatchNorm as an affine layer, sums and reductions, relevance pass-through, the plain twin of a
  same-padding convolution);
* :mod:`.transformers`: normalisation at constant std, products of two activations, softmax, and
  the expansion of fused attention into them;
* :mod:`.ops`: the table of operations: which traced function or method is a sum, a product, a
  reduction, routing, an activation;
* :mod:`.tracing`: the :mod:`torch.fx` trace with LRP's leaf modules (specialised to the input's
  shape where the forward branches on shapes), and source lines for errors;
* :mod:`.rewriter`: the pass over the graph that applies the table, and :func:`canonize`.
"""

from heatmapbench.explain.canonize.layers import (
    BatchNormAffine, FoldedLinear, Reduce, fold, pass_relevance, plain_conv_twin, stack_terms,
)
from heatmapbench.explain.canonize.rewriter import GATES, PURPOSES, CanonicalGraph, Refusal, canonize
from heatmapbench.explain.canonize.tracing import source_line, trace
from heatmapbench.explain.canonize.transformers import ConstantFactorProduct, NormStdConstant, UniformProduct

__all__ = [
    "BatchNormAffine",
    "CanonicalGraph",
    "ConstantFactorProduct",
    "FoldedLinear",
    "GATES",
    "NormStdConstant",
    "PURPOSES",
    "Reduce",
    "Refusal",
    "canonize",
    "fold",
    "pass_relevance",
    "plain_conv_twin",
    "source_line",
    "stack_terms",
    "trace",
    "UniformProduct",
]
