"""The application: the commands (train, evaluate, report, roar, runs) and what only they need.

Everything here builds on the library (``heatmapbench.explain``, ``.perturbation``, ``.metrics``,
``.evaluation``, ``.models``, ``.data``, ``.accel``, ``.callbacks``) and the library never imports
it back:

* :mod:`.train`, :mod:`.evaluate`, :mod:`.report`, :mod:`.roar`: the commands ``heatmapbench-train``,
  ``heatmapbench-evaluate``, ``heatmapbench-report`` and ``heatmapbench-roar`` (thin: compose, check,
  instantiate, run), and :mod:`.runs` (``heatmapbench-runs``: runs a dead process left RUNNING);
  :mod:`.resume` and :mod:`.sanity`: parts of ``heatmapbench-evaluate``;
* :mod:`.plumbing`: what the commands share (objects from the config, user errors as one-line exits);
* :mod:`.schema`: the typed Hydra config schema and its validation;
* :mod:`.adapt_model`: the configured model fitted to the data (class count, preprocessing);
* :mod:`.tracking`: the MLflow run lifecycle (opening, closing FINISHED/FAILED/KILLED, signals, heartbeat);
  :mod:`.provenance`: what a run records (params, name, tags, git commit); :mod:`.store`: the store
  under the runs (tracking URI, locking, bounded retries, disk reserve);
* :mod:`.preflight`: checks before any work starts and before any run exists;
* :mod:`.ui`: links into the MLflow UI.
"""
