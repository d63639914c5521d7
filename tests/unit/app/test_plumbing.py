"""The commands' shared plumbing: a launcher named on the command line but not installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from heatmapbench.app import plumbing
from tests.helpers import cli_env


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


def test_an_installed_launcher_passes_and_the_command_checks_before_hydra(tmp_path):
    for name in plumbing.LAUNCHERS:  # the launchers extra is installed where the tests run
        plumbing.check_launcher([f"hydra/launcher={name}"])
    # the real command, with the plugin hidden: the line comes before Hydra composes anything
    code = ("import importlib.util, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda n, *a: None if n.startswith('hydra_plugins.') else real(n, *a); "
            "sys.argv = ['heatmapbench-evaluate', '-m', 'hydra/launcher=submitit_slurm']; "
            "from heatmapbench.app.evaluate import main; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=cli_env(),
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: hydra/launcher=submitit_slurm needs hydra-submitit-launcher, which is not installed; install it "
        "with: pip install 'heatmapbench[launchers]'"), proc.stderr[-2000:]
