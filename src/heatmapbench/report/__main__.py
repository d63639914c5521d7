"""``python -m heatmapbench.report`` keeps working for one release; the command is ``heatmapbench-report``."""

if __name__ == "__main__":
    from heatmapbench.app.report.command import main

    main()
