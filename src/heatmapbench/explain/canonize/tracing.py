"""The :mod:`torch.fx` trace a canonical graph starts from, and the source lines its errors name."""

from __future__ import annotations

import inspect
import traceback
import warnings

import torch
from torch import fx, nn
from torch.fx.experimental.meta_tracer import MetaTracer
from zennit.types import BatchNorm, Linear

from heatmapbench.accel.fusion import FusedConv

__all__ = ["source_line", "trace"]


class _Tracer(fx.Tracer):
    """torch.nn leaves plus every conv/linear/BatchNorm subclass (e.g. a same-padding conv)."""

    def __init__(self, record_stack_traces: bool = False) -> None:
        super().__init__()
        self.record_stack_traces = record_stack_traces

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # FusedConv reads its folded weights at call time: never traced through. A BatchNorm subclass
        # with its own forward (timm's BatchNormAct2d: norm, then an activation) is traced through,
        # so that a SiLU inside it is not folded into the conv as if it were affine
        if isinstance(m, BatchNorm) and type(m).forward is not nn.modules.batchnorm._BatchNorm.forward:
            return False
        return isinstance(m, (Linear, BatchNorm, FusedConv)) or super().is_leaf_module(m, qualname)


def _user_frame(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/heatmapbench/explain/" not in f.filename]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


class _ShapeTracer(MetaTracer, _Tracer):
    """The same leaves, with proxies that know the shape, dtype and device of an example input.

    Python control flow on shapes (``if x.shape[-1] < k``) then takes the example's branch; control
    flow on tensor *values* still raises (a proxy's ``bool`` is never answered from the example).
    The example's values are only used to propagate shapes through leaf modules.
    """


def trace(model: nn.Module, record_stack_traces: bool = False, example: torch.Tensor | None = None) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` (eval); a clear error naming the untraceable code otherwise.

    Where the plain trace fails and ``example`` (an input batch) is given, the model is traced again
    with shape-aware proxies (:class:`_ShapeTracer`): the graph is then valid for inputs of the
    example's shape and dtype only, recorded as ``specialised_to`` (``None`` for a general graph).
    """
    if "forward" in vars(model):
        raise ValueError(
            f"{type(model).__name__}'s forward was replaced on the instance; torch.fx traces the class's "
            "forward, so LRP would explain different code. Define the forward in a (sub)class instead."
        )
    tracer = _Tracer(record_stack_traces)
    first, defaults = _signature(model)
    own = set(vars(model))
    try:
        return _traced(model, tracer, first, defaults, example, record_stack_traces)
    finally:
        for key in set(vars(model)) - own:  # tensor constants the tracer stores on its root: the graph
            delattr(model, key)            # module has its copies; the user's model stays untouched


def _traced(model: nn.Module, tracer: _Tracer, first: str, defaults: dict, example: torch.Tensor | None,
            record_stack_traces: bool) -> fx.GraphModule:
    specialised = None
    try:
        graph = tracer.trace(model, concrete_args=defaults)
    except Exception as err:  # noqa: BLE001 - any failure of tracing user code is reported the same way
        failure = err
        if example is not None:
            tracer = _ShapeTracer()
            tracer.record_stack_traces = record_stack_traces
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.filterwarnings("ignore", message="Could not compute metadata")
                    graph = tracer.trace(model, meta_args={first: example.detach()}, concrete_args=defaults)
                specialised = (tuple(example.shape), example.dtype)
                failure = None
            except Exception as shape_err:  # noqa: BLE001 - reported like the plain trace's failure
                failure = shape_err
        if failure is not None:
            raise ValueError(
                f"LRP needs the data flow of {type(model).__name__}, but torch.fx cannot trace it at "
                f"{_user_frame(failure)} ({type(failure).__name__}: "
                f"{str(failure).splitlines()[0] if str(failure) else ''}). "
                "Write the forward without Python control flow on tensor values (or move that code into "
                "a torch.nn module with a supported type)."
            ) from failure
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.specialised_to = specialised
    return gm


def _signature(model: nn.Module) -> tuple[str, dict]:
    """The name of the forward's input and its other parameters' defaults: explainers call
    ``model(x)``, so options such as ``attn_mask=None`` are traced as the constants they are."""
    params = list(inspect.signature(model.forward).parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise ValueError(f"{type(model).__name__}.forward takes no positional input to explain")
    defaults = {p.name: p.default for p in params[1:]
                if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}
    return params[0].name, defaults


def source_line(node: fx.Node) -> str:
    """``file:line: code`` of the user code that created ``node`` (from its recorded stack trace)."""
    lines = (node.stack_trace or "").strip().splitlines()
    found = "source line unknown"
    for i, line in enumerate(lines):
        line = line.strip()
        if not line.startswith("File "):
            continue
        parts = line.split(",")
        file = parts[0][len("File "):].strip().strip('"')
        if "/torch/" in file:
            continue  # torch's own frames (module call machinery, the tracer)
        number = parts[1].strip().replace("line ", "") if len(parts) > 1 else "?"
        code = lines[i + 1].strip() if i + 1 < len(lines) else ""
        found = f"{file}:{number}: {code}"
    return found
