"""The :mod:`torch.fx` trace a canonical graph starts from, and the source lines its errors name."""

from __future__ import annotations

import torch
from torch import fx, nn

from heatmapbench import fxgraph

__all__ = ["source_line", "trace"]


def trace(model: nn.Module, record_stack_traces: bool = False, example: torch.Tensor | None = None) -> fx.GraphModule:
    """``torch.fx`` trace of ``model`` (eval) with LRP's leaves (:class:`heatmapbench.fxgraph.LayerTracer`);
    a clear error naming the untraceable code otherwise.

    Where the plain trace fails and ``example`` (an input batch) is given, the model is traced again
    with shape-aware proxies: the graph is then valid for inputs of the example's shape and dtype
    only, recorded as ``specialised_to`` (``None`` for a general graph); see
    :func:`heatmapbench.fxgraph.trace`.
    """
    try:
        return fxgraph.trace(model, fxgraph.LayerTracer(record_stack_traces), example=example)
    except fxgraph.TraceError as err:
        raise ValueError(
            f"LRP needs the data flow of {err.model_name}, but torch.fx cannot trace it at {err.where} "
            f"({err.cause}). Write the forward without Python control flow on tensor values (or move that "
            "code into a torch.nn module with a supported type)."
        ) from err.__cause__


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
