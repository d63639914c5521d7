"""The :mod:`torch.fx` trace a canonical graph starts from, and the source lines its errors name."""

from __future__ import annotations

import traceback

from torch import fx, nn
from zennit.types import BatchNorm, Linear

from heatmapbench.accel.fusion import FusedConv

__all__ = ["source_line", "trace"]


class _Tracer(fx.Tracer):
    """torch.nn leaves plus every conv/linear/BatchNorm subclass (e.g. a same-padding conv)."""

    def __init__(self, record_stack_traces: bool = False) -> None:
        super().__init__()
        self.record_stack_traces = record_stack_traces

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # FusedConv reads its folded weights at call time: never traced through
        return isinstance(m, (Linear, BatchNorm, FusedConv)) or super().is_leaf_module(m, qualname)


def _user_frame(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/heatmapbench/explain/" not in f.filename]
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def trace(model: nn.Module, record_stack_traces: bool = False) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` (eval); a clear error naming the untraceable code otherwise."""
    if "forward" in vars(model):
        raise ValueError(
            f"{type(model).__name__}'s forward was replaced on the instance; torch.fx traces the class's "
            "forward, so LRP would explain different code. Define the forward in a (sub)class instead."
        )
    tracer = _Tracer(record_stack_traces)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - any failure of tracing user code is reported the same way
        raise ValueError(
            f"LRP needs the data flow of {type(model).__name__}, but torch.fx cannot trace it at "
            f"{_user_frame(err)} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Write the forward without Python control flow on tensor values (or move that code into "
            "a torch.nn module with a supported type)."
        ) from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


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
