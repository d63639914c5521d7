"""The README's Layout section, generated from the package: one line per package or module, its job
being the first line of its docstring (so the layout cannot drift from the code).

    python scripts/layout.py           # print the block
    python scripts/layout.py --write   # rewrite README.md's Layout block

tests/unit/test_readme_layout.py checks that README.md holds exactly this block.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "heatmapbench"
START, END = "## Layout\n\n```\n", "```\n"
#: packages whose modules are listed too: the application layer, which the library never imports
EXPANDED = ("app",)
OTHERS = [
    ("tests/", "pytest: unit/<package>/ mirrors the package, integration/ runs the commands; helpers.py"),
    ("benches/", "benchmark scripts (print ratios measured in one run)"),
    ("scripts/", "generators: this layout, the docs' configuration reference, figures, screenshots"),
    ("docs/", "the documentation site (MkDocs)"),
    ("constraints.txt", "the exact versions make installs (the package itself declares ranges)"),
]


def is_shim(path: Path) -> bool:
    text = path.read_text()
    return "from heatmapbench._moved import moved" in text or (text.startswith('"""``python -m') and "keeps working" in text)


def job(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.split("\n")[0].replace("``", "")


def entries(folder: Path, depth: int) -> list[str]:
    lines = []
    for path in sorted(folder.iterdir(), key=lambda p: (p.name == "app", p.name)):
        source = path / "__init__.py" if path.is_dir() else path
        if path.name.startswith("_") or not source.is_file() or source.suffix != ".py" or is_shim(source):
            continue
        name = path.name + ("/" if path.is_dir() else "")
        lines.append(f"{'  ' * depth}{name:<{22 - 2 * depth}}{job(source)}")
        if path.is_dir() and path.name in EXPANDED:
            lines += entries(path, depth + 1)
    return lines


def layout() -> str:
    lines = ["src/heatmapbench/     the package; the library below, app/ (the application) last",
             "  conf/               Hydra configs, one folder per group (shipped in the wheel)",
             *entries(PACKAGE, 1),
             "  (old paths such as heatmapbench.config, .fuse, .train are deprecation shims, kept one release)",
             *(f"{name:<22}{what}" for name, what in OTHERS)]
    return "\n".join(lines) + "\n"


def readme_block(readme: str) -> str:
    start = readme.index(START) + len(START)
    return readme[start:readme.index(END, start)]


if __name__ == "__main__":
    block = layout()
    if "--write" in sys.argv[1:]:
        readme = (REPO / "README.md").read_text()
        start = readme.index(START) + len(START)  # spliced by position: an empty block is found anywhere
        (REPO / "README.md").write_text(readme[:start] + block + readme[readme.index(END, start):])
    else:
        sys.stdout.write(block)
