"""Fail when the built site would fetch anything at view time (scripts, stylesheets, fonts, images).

    python scripts/docs_offline_check.py site
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# What a browser loads by itself: <script src>, <link rel=stylesheet|preload|icon href>, <img src>,
# CSS url()/@import. Plain links (<a href>) are the reader's choice and stay allowed.
PATTERNS = [
    re.compile(r"<script[^>]+src=[\"'](https?:)?//", re.I),
    re.compile(r"<link[^>]+href=[\"'](https?:)?//[^\"']+[\"'][^>]*>", re.I),
    re.compile(r"<img[^>]+src=[\"'](https?:)?//", re.I),
    re.compile(r"url\([\"']?(https?:)?//", re.I),
    re.compile(r"@import\s+[\"'](https?:)?//", re.I),
]


def problems(site: Path) -> list[str]:
    found = []
    for path in sorted(site.rglob("*")):
        if path.suffix not in (".html", ".css"):
            continue
        text = path.read_text(errors="replace")
        for pattern in PATTERNS:
            for match in pattern.finditer(text):
                tag = match.group(0)
                if tag.lower().startswith("<link") and not re.search(r"rel=[\"']?(stylesheet|preload|icon|modulepreload)",
                                                                        tag, re.I):
                    continue
                found.append(f"{path.relative_to(site)}: {tag[:120]}")
    return found


def main(argv: list[str]) -> int:
    site = Path(argv[1] if len(argv) > 1 else "site")
    if not (site / "index.html").is_file():
        print(f"error: {site}/index.html not found; build the site first (make docs)")
        return 2
    found = problems(site)
    for line in found:
        print(f"error: fetched at view time: {line}")
    if not found:
        print(f"{site}: nothing is fetched at view time")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
