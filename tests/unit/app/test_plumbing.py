"""The commands' shared plumbing: a launcher named on the command line but not installed."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest

from heatmapbench.app import plumbing


def test_a_missing_launcher_is_one_line_naming_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.") else real(name, *a))
    with pytest.raises(SystemExit) as err:
        plumbing.check_launcher(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    assert err.value.code == 2
    assert capsys.readouterr().err == ("error: hydra/launcher=joblib needs hydra-joblib-launcher, which is not "
                                       "installed; install it with: pip install 'heatmapbench[launchers]'\n")
    plumbing.check_launcher(["hydra/launcher=basic", "evaluation.steps=3"])  # Hydra's own launcher: no extra


def test_an_installed_launcher_passes_and_the_command_checks_before_hydra(monkeypatch, capsys):
    from heatmapbench.app.evaluate import main

    for name in plumbing.LAUNCHERS:  # the launchers extra is installed where the tests run
        plumbing.check_launcher([f"hydra/launcher={name}"])
    # the real command's main, with the plugin hidden: the line comes before Hydra reads the command line
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.") else real(name, *a))
    monkeypatch.setattr(sys, "argv", ["heatmapbench-evaluate", "-m", "hydra/launcher=submitit_slurm"])

    def hydra_starts(*args, **kwargs):
        raise AssertionError("Hydra read the command line before the launcher was checked")

    monkeypatch.setattr(importlib.import_module("hydra.main"), "get_args_parser", hydra_starts)
    with pytest.raises(SystemExit) as err:
        main()
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: hydra/launcher=submitit_slurm needs hydra-submitit-launcher, which is not installed; install it "
        "with: pip install 'heatmapbench[launchers]'")
