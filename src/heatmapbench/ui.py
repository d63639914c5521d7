"""Deprecated: moved to :mod:`heatmapbench.app.ui` (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved("heatmapbench.ui", "heatmapbench.app.ui")

if __name__ == "__main__":  # python -m heatmapbench.ui keeps working
    from heatmapbench.app.ui import main

    raise SystemExit(main())
