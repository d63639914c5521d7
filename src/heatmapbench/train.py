"""Deprecated: moved to :mod:`heatmapbench.app.train` (this path goes in the next release)."""

from heatmapbench._moved import moved

__getattr__, __all__ = moved("heatmapbench.train", "heatmapbench.app.train")

if __name__ == "__main__":  # python -m heatmapbench.train keeps working
    from heatmapbench.app.train import main

    main()
