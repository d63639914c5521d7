"""``python -m heatmapbench.report``."""

from heatmapbench.report.cli import main

if __name__ == "__main__":
    main()
