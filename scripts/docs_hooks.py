"""MkDocs hooks: pages generated from the code at build time (never written twice).

``reference/config.md`` comes from ``conf/`` and the schemas (``scripts/config_reference.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

sys.path.insert(0, str(Path(__file__).resolve().parent))

import config_reference  # noqa: E402


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "reference/config.md", content=config_reference.page()))
    return files
