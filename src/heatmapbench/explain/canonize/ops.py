"""The table of operations: which traced function, method or module is a sum, a product, a
reduction, routing or an activation, and so which LRP rule it gets (see the table in
:mod:`heatmapbench.explain.canonize`)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from heatmapbench.explain.canonize.transformers import Softmax, attention_scale


def _ops(*names: str) -> set:
    """Functions (torch., F., operator.) and method names for the given op names."""
    out: set = set()
    for name in names:
        out.add(name)  # method name
        for space in (torch, F, operator, torch.Tensor):
            fn = getattr(space, name, None)
            if fn is not None:
                out.add(fn)
    return out


ADD = _ops("add", "add_", "iadd", "__add__", "__iadd__", "__radd__")
SUB = _ops("sub", "sub_", "isub", "subtract", "__sub__", "__rsub__")
MUL = _ops("mul", "mul_", "imul", "multiply", "__mul__", "__rmul__")
DIV = _ops("truediv", "div", "div_", "itruediv", "divide", "true_divide", "__truediv__")
NEG = _ops("neg", "negative", "neg_")
REDUCE = _ops("mean", "sum", "avg_pool1d", "avg_pool2d", "avg_pool3d",
              "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d")
ROUTING = _ops(
    "flatten", "view", "reshape", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
    "expand", "expand_as", "view_as", "reshape_as", "getitem", "cat", "concat", "concatenate",
    "stack", "chunk", "split", "narrow", "select", "index_select", "repeat", "tile", "movedim",
    "unflatten", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
    "adaptive_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices", "clone", "to",
    "float", "double", "half", "type", "type_as", "unbind", "pixel_shuffle", "channel_shuffle",
    "pad", "constant_pad_nd",  # F.pad: what nn.ZeroPad2d / nn.ConstantPad2d do as modules
    "roll", "flip",
)
DROPOUT = _ops("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout")
NON_TENSOR = _ops("size", "dim", "numel", "ndimension") | {getattr, len, attention_scale}
MATMUL = _ops("matmul", "bmm", "imatmul", "__matmul__")
NORMS = _ops("layer_norm", "rms_norm")
INTERPOLATE = _ops("interpolate", "upsample", "upsample_nearest", "upsample_bilinear")
#: functional activations -> module factory (kwargs of the call are passed on)
ACTIVATIONS: dict[Any, Callable[..., nn.Module]] = {}
for _names, _factory in [
    (("relu", "relu_"), lambda inplace=False: nn.ReLU()),
    (("relu6",), lambda inplace=False: nn.ReLU6()),
    (("leaky_relu", "leaky_relu_"), lambda negative_slope=0.01, inplace=False: nn.LeakyReLU(negative_slope)),
    (("silu",), lambda inplace=False: nn.SiLU()),
    (("gelu",), lambda approximate="none": nn.GELU(approximate=approximate)),
    (("hardswish",), lambda inplace=False: nn.Hardswish()),
    (("hardsigmoid",), lambda inplace=False: nn.Hardsigmoid()),
    (("sigmoid", "sigmoid_"), lambda: nn.Sigmoid()),
    (("tanh", "tanh_"), lambda: nn.Tanh()),
    (("elu", "elu_"), lambda alpha=1.0, inplace=False: nn.ELU(alpha)),
    (("hardtanh", "hardtanh_"), lambda min_val=-1.0, max_val=1.0, inplace=False: nn.Hardtanh(min_val, max_val)),
    (("softmax",), lambda dim=None, _stacklevel=3, dtype=None: Softmax(dim, dtype)),
]:
    for _op in _ops(*_names):
        ACTIVATIONS[_op] = _factory
INPLACE = _ops("relu_", "leaky_relu_", "sigmoid_", "tanh_", "elu_", "hardtanh_", "add_", "iadd", "sub_",
               "isub", "mul_", "imul", "div_", "itruediv", "neg_")
#: activations whose output is read as a gate by ``gates="constant"``
GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
#: leaf modules that only route values (the plain gradient is their rule)
ROUTING_MODULES = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd, nn.modules.padding._ConstantPadNd,
    nn.modules.padding.ZeroPad2d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.ChannelShuffle, nn.PixelShuffle,
)
RECTIFIERS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)


def _op_key(node: fx.Node) -> Any:
    return node.target


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        return f"{module}.{getattr(node.target, '__name__', node.target)}".lstrip(".")
    return f"{node.op} {node.target}"


def _is_stochastic_depth_eval(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", "")
    if node.op != "call_function" or name != "stochastic_depth":
        return False
    training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
    return training is False
