"""Docstrings are written with reStructuredText roles (``:func:`~heatmapbench.x.f```, ``:data:`X```),
as Sphinx and the Python docs read them; the docs site renders Markdown. This griffe extension
turns each role into a code span of the name as it would print (``~`` keeps the last part)."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|obj|exc|paramref):`(~?)([^`]+)`")


def markdown(text: str) -> str:
    return ROLE.sub(lambda m: f"`{m.group(2).split('.')[-1] if m.group(1) else m.group(2)}`", text)


class RstRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
