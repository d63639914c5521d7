"""``python -m heatmapbench.app.report``."""

from heatmapbench.app.report.command import main

if __name__ == "__main__":
    main()
