"""The commands' shared plumbing: a launcher named on the command line but not installed."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest

from heatmapbench.app import plumbing
from tests.helpers import compose_config


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


# -- <group>=null on the command line ------------------------------------------------------------
DEMO = ["experiment=sanity_demo", "model.net.ckpt_path=/models/last.ckpt"]


def test_a_null_config_group_is_removed_from_the_defaults(tmp_path, data_dir):
    from heatmapbench.app.sanity import sanity_settings

    argv = ["-m", *DEMO, "sanity=null", "ckpt_path=null", "+x=null", "explainer=NULL", "~callbacks"]
    assert plumbing.null_groups(argv) == ["-m", *DEMO, "~sanity", "ckpt_path=null", "+x=null", "~explainer",
                                          "~callbacks"]
    # Hydra alone refuses it after the experiment selected mprt (negative control of the rewrite)
    with pytest.raises(Exception, match="Config group override must be a string or a list"):
        compose_config("evaluate", [*DEMO, "sanity=null"], tmp_path, data_dir)
    assert sanity_settings(compose_config("evaluate", DEMO, tmp_path, data_dir)).num_images == 32
    off = compose_config("evaluate", plumbing.null_groups([*DEMO, "sanity=null"]), tmp_path, data_dir)
    assert off.sanity.num_images == 32  # the experiment's own values stay in the config, without a choice
    assert sanity_settings(off) is None
    plain = compose_config("evaluate", plumbing.null_groups(["sanity=null"]), tmp_path, data_dir)  # the null default
    assert plain.get("sanity") is None and sanity_settings(plain) is None


def test_a_sweep_over_null_and_a_config_is_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        plumbing.null_groups(["-m", "sanity=null,mprt"])
    assert err.value.code == 2
    assert capsys.readouterr().err == ("error: sanity=null,mprt is invalid: Hydra cannot sweep the config group sanity "
                                       "over null; sweep the other choices, and run the one without sanity as its own "
                                       "command (sanity=null)\n")
    assert plumbing.null_groups(["-m", "sanity=mprt", "evaluation.orders=null,morf"]) == [
        "-m", "sanity=mprt", "evaluation.orders=null,morf"]  # values, not groups, stay as they are


def test_the_commands_rewrite_the_command_line_before_hydra(monkeypatch, tmp_path):
    from heatmapbench.app import evaluate, roar, train
    from heatmapbench.app.report import command
    from heatmapbench.app.sanity import sanity_settings

    seen = []
    monkeypatch.setattr(evaluate, "run_evaluate", lambda cfg: seen.append(cfg) or {})
    monkeypatch.setattr("sys.argv", ["heatmapbench-evaluate", *DEMO, "sanity=null", f"hydra.run.dir={tmp_path}",
                                     "hydra/job_logging=none", "hydra/hydra_logging=none"])
    monkeypatch.chdir(tmp_path)
    evaluate.main()  # the real entry point: Hydra composes what the command line says
    (cfg,) = seen
    assert sanity_settings(cfg) is None and list(cfg.evaluation.orders) == ["morf", "lerf"]
    door = plumbing.launchers_checked(print).__code__  # the wrapper every Hydra command goes through
    assert all(main.__code__ is door for main in (evaluate.main, train.main, roar.main, command.main))


# -- a config Hydra cannot compose from the command line ---------------------------------------------
def _command_line(monkeypatch, tmp_path, command, *argv):
    """A command's real entry point, with ``argv`` (and folders in ``tmp_path``) as its command line."""
    import importlib

    main = importlib.import_module(f"heatmapbench.app.{command}").main
    monkeypatch.setattr("sys.argv", [f"heatmapbench-{command}", *argv, f"hydra.run.dir={tmp_path}/out",
                                     f"hydra.sweep.dir={tmp_path}/sweep", f"paths.mlruns_dir={tmp_path}/mlruns"])
    monkeypatch.chdir(tmp_path)
    return main


@pytest.mark.parametrize("command, argv, line", [
    ("train", ["trainer.max_epoch=1"],
     "error: trainer.max_epoch is not a setting of trainer: did you mean trainer.max_epochs?"),
    ("evaluate", ["evaluation.step=3"],
     "error: evaluation.step is not a setting of evaluation: did you mean evaluation.steps?"),
    ("train", ["model.lr=0.1"],
     "error: model.lr is not a setting of model: its keys are net, num_classes, optimizer, scheduler"),
    ("evaluate", ["model=vgg16", "model.net.allow_downlod=true"],
     "error: model.net.allow_downlod is not a setting of model.net: did you mean model.net.allow_download?"),
    ("train", ["model.net.image_size=32"], "error: model.net.image_size is an argument of heatmapbench.models.SmallCNN "
                                           "that the config does not list: add it with +model.net.image_size=..."),
    ("evaluate", ["model=small_cn"], "error: model=small_cn is not a choice of model: did you mean model=small_cnn? "
                                     "choose from alexnet, checkpoint, convnext_tiny, efficientnet_lite0, googlenet, "
                                     "hf, resnet50, small_cnn, small_vit, swin_t, timm, vgg16, vgg_small, vit_b_16"),
    ("evaluate", ["evaluation.orders=[morf"],
     "error: evaluation.orders=[morf does not parse (no viable alternative at input '[morf'); see "
     "https://hydra.cc/docs/1.2/advanced/override_grammar/basic for details"),
], ids=["key", "near-key", "far-key", "net-key", "net-argument-left-out", "choice", "grammar"])
@pytest.mark.parametrize("user", [None, "0"], ids=["unset", "full-error-0"])
def test_a_config_that_does_not_compose_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys, command, argv, line,
                                                               user):
    if user is None:
        monkeypatch.delenv(plumbing.FULL_ERROR, raising=False)
    else:
        monkeypatch.setenv(plumbing.FULL_ERROR, user)
    main = _command_line(monkeypatch, tmp_path, command, *argv)
    with pytest.raises(SystemExit) as err:
        main()
    assert err.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]
    assert os.environ.get(plumbing.FULL_ERROR) == user  # the user's setting is given back
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlruns").exists()  # no output folder, no run


def test_the_run_itself_is_reported_by_hydra_as_before(monkeypatch, tmp_path):
    from heatmapbench.app import evaluate

    monkeypatch.delenv(plumbing.FULL_ERROR, raising=False)
    seen = []
    monkeypatch.setattr(evaluate, "run_evaluate", lambda cfg: seen.append(os.environ.get(plumbing.FULL_ERROR)) or {})
    main = _command_line(monkeypatch, tmp_path, "evaluate", "hydra/job_logging=none", "hydra/hydra_logging=none")
    main()
    assert seen == [None]  # while the command runs, Hydra's switch is the user's (unset): Hydra reports as always
    assert os.environ.get(plumbing.FULL_ERROR) is None


def test_a_user_who_asked_for_full_errors_and_a_sweep_get_hydras_report(monkeypatch, tmp_path, capsys):
    from hydra.errors import ConfigCompositionException

    monkeypatch.setenv(plumbing.FULL_ERROR, "1")
    main = _command_line(monkeypatch, tmp_path, "train", "trainer.max_epoch=1")
    with pytest.raises(ConfigCompositionException, match="Could not override 'trainer.max_epoch'"):
        main()  # HYDRA_FULL_ERROR=1: Hydra raises what failed, with its traceback
    monkeypatch.delenv(plumbing.FULL_ERROR)
    main = _command_line(monkeypatch, tmp_path, "train", "-m", "trainer.max_epoch=1")
    with pytest.raises(SystemExit) as err:
        main()  # a sweep composes each job in its launcher: Hydra's own message and status
    assert err.value.code == 1
    assert "Could not override 'trainer.max_epoch'" in capsys.readouterr().err
    assert os.environ.get(plumbing.FULL_ERROR) is None


def test_composition_error_lines_without_a_command():
    from hydra.errors import MissingConfigException

    err = MissingConfigException("Could not find 'data/fashion'", missing_cfg_file="data/fashion",
                                 options=["_base", "fashion_mnist", "imagefolder", "data_schema"])
    assert plumbing.composition_error(err) == ("data=fashion is not a choice of data: did you mean data=fashion_mnist? "
                                               "choose from fashion_mnist, imagefolder")
    far = MissingConfigException("Could not find 'data/zzz'", missing_cfg_file="data/zzz", options=["imagefolder"])
    assert plumbing.composition_error(far) == "data=zzz is not a choice of data: choose from imagefolder"
    nets = MissingConfigException("Could not find 'model/net/mine'", missing_cfg_file="model/net/mine",
                                  options=["small_cnn_schema", "vgg16_schema"])
    assert plumbing.composition_error(nets) == ("model/net=mine is not a choice: model/net holds only the schemas that "
                                                "the model configs name")
    assert plumbing.composition_error(ValueError("a\n  b.\n")) == "a; b"  # any other message: its lines joined
