"""README.md's Layout section is the one scripts/layout.py generates from the package's docstrings."""

from __future__ import annotations

import importlib.util

from tests.helpers import REPO


def test_the_readme_layout_is_generated_from_the_package():
    spec = importlib.util.spec_from_file_location("layout", REPO / "scripts" / "layout.py")
    layout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layout)
    block = layout.readme_block((REPO / "README.md").read_text())
    assert block == layout.layout(), "README.md's Layout is stale: run python scripts/layout.py --write"
    assert "  explain/" in block and "    train.py" in block and "fuse.py" not in block  # shims are left out
