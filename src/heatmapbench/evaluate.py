"""Deprecated: moved to :mod:`heatmapbench.app.evaluate` (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved("heatmapbench.evaluate", "heatmapbench.app.evaluate")

if __name__ == "__main__":  # python -m heatmapbench.evaluate keeps working
    from heatmapbench.app.evaluate import main

    main()
