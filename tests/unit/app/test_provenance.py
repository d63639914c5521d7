"""What a person sees in the MLflow runs table: readable params, meaningful unique names, shared tags."""

from __future__ import annotations

import os

from heatmapbench.app.provenance import readable_params, run_identity, run_tags
from tests.helpers import compose_config


def test_train_params_are_readable(tmp_path, data_dir):
    cfg = compose_config("train", ["experiment=demo", "trainer.max_epochs=2", "model.optimizer.lr=0.01",
                                   "ckpt_path=/abs/where/checkpoints/last.ckpt"], tmp_path, data_dir)
    params = readable_params(cfg)
    assert not [k for k in params if "_target_" in k or k.split(".")[0] in ("paths", "logger", "hydra")]
    assert not [v for v in params.values() if os.path.isabs(v)], params
    assert params["ckpt_path"] == "…/checkpoints/last.ckpt"
    assert params["model.net"] == "SmallCNN" and params["data"] == "FashionMNISTDataModule"
    tags = run_tags(cfg, "train")
    assert {k: params[k] for k in ("model", "data", "perturbation")} == {  # one name per concept
        k: tags[k] for k in ("model", "data", "perturbation")} == {
        "model": "SmallCNN", "data": "FashionMNISTDataModule", "perturbation": "uniform"}
    assert "None" not in params.values() and "task_name" not in params  # the tag task says it
    assert params["trainer.max_epochs"] == "2" and params["model.optimizer.lr"] == "0.01"
    assert params["evaluation.region_size"] == str(cfg.evaluation.region_size)
    assert params["seed"] == str(cfg.seed)
    assert "callbacks.aopc.every_n_epochs" in params
    assert not [k for k in params if k.startswith("callbacks.aopc.settings")]  # ${evaluation} restated
    assert not [k for k in params if k.startswith(("callbacks.model_checkpoint", "callbacks.progress_bar"))]
    # only the Trainer arguments that change what is trained
    assert "trainer.enable_checkpointing" not in params and "trainer.devices" in params and "trainer" not in params
    assert "progress" not in params and "data.num_workers" not in params  # display and loading mechanics
    assert len(params) < 65, sorted(params)  # the demo's settings (~60), not the whole config (~150)


def test_names_are_unique_and_say_what_ran_and_tags_match(tmp_path, data_dir):
    cfg = compose_config("train", ["experiment=demo", "trainer.max_epochs=2"], tmp_path, data_dir)
    (a, sweep), (b, _) = run_identity(cfg, "train"), run_identity(cfg, "train")
    assert run_identity(compose_config("train", ["model.optimizer.lr=0.01"], tmp_path, data_dir), "train")[0].split()[2] == "lr=0.01"
    assert a != b and sweep == {}
    assert a.startswith("train SmallCNN/FashionMNIST max_epochs=2 experiment=demo ")
    quiet = compose_config("train", ["experiment=demo", "progress=false", "model.optimizer.lr=0.01"], tmp_path, data_dir)
    assert run_identity(quiet, "train")[0].startswith("train SmallCNN/FashionMNIST lr=0.01 experiment=demo ")
    train = run_tags(cfg, "train", ["random"])
    ev = compose_config("evaluate", ["model=small_cnn", "data=fashion_mnist"], tmp_path, data_dir)
    evaluate = run_tags(ev, "evaluate", ["random"])
    assert set(train) == set(evaluate) == {"task", "model", "data", "perturbation", "explainers"}
    assert {k: train[k] for k in ("model", "data", "perturbation")} == {k: evaluate[k] for k in ("model", "data", "perturbation")}


def test_ui_links_open_the_model_training_view(tmp_path):
    from mlflow import MlflowClient

    from heatmapbench.app.ui import main, training_view_urls

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert training_view_urls(uri, "http://h:1") == []  # no store yet
    client = MlflowClient(uri)
    ids = [client.create_experiment(name, artifact_location=str(tmp_path / name)) for name in ("a", "b")]
    links = dict(training_view_urls(uri, "http://h:1"))
    assert links["a"] == f"http://h:1/#/experiments/{ids[0]}/runs?workflowType=machine_learning"
    assert "compare-experiments" in links["all of them"] and "machine_learning" in links["all of them"]
    assert "Default" not in links  # empty
    assert main(["--tracking-uri", uri, "--port", "1"]) == 0


def test_the_model_tag_names_the_network_of_a_generic_builder(tmp_path, data_dir):
    folder = tmp_path / "my-vit"
    folder.mkdir()
    timm = compose_config("evaluate", ["model=timm", "model.net.name=convnext_atto"], tmp_path, data_dir)
    hf = compose_config("evaluate", ["model=hf", f"model.net.path={folder}"], tmp_path, data_dir)
    hub = compose_config("evaluate", ["model=hf", "model.net.path=acme/vit-tiny"], tmp_path, data_dir)
    zoo = compose_config("evaluate", ["model=resnet50"], tmp_path, data_dir)
    assert run_tags(timm, "evaluate")["model"] == "timm_model:convnext_atto"
    assert run_tags(hf, "evaluate")["model"] == "hf_model:my-vit"
    assert run_tags(hub, "evaluate")["model"] == "hf_model:acme/vit-tiny"
    assert run_tags(zoo, "evaluate")["model"] == "resnet50"
    assert run_identity(timm, "evaluate")[0].startswith("evaluate timm_model:convnext_atto/")


def test_ui_links_to_the_newest_run_and_its_key_figure_keep_the_view(tmp_path, capsys):
    from mlflow import MlflowClient

    from heatmapbench.app.ui import KEEP_VIEW, main, newest_run_urls

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    eid = client.create_experiment("train", artifact_location=str(tmp_path / "art"))
    old = client.create_run(eid, start_time=1_000).info.run_id
    new = client.create_run(eid, start_time=2_000).info.run_id
    figure = tmp_path / "accuracy_vs_aopc.png"
    figure.write_bytes(b"png")
    client.log_artifact(new, str(figure), "aopc")
    (name, run, key), = newest_run_urls(uri, "http://h:1")
    assert name == "train" and old not in run
    assert run == f"http://h:1/#/experiments/{eid}/runs/{new}?workflowType=machine_learning"
    assert key == f"http://h:1/#/experiments/{eid}/runs/{new}/artifacts/aopc/accuracy_vs_aopc.png?workflowType=machine_learning"
    client.create_run(eid, start_time=3_000)  # a newer run without figures: its link, no figure
    assert newest_run_urls(uri, "http://h:1")[0][2] is None
    assert main(["--tracking-uri", uri, "--port", "1"]) == 0
    out = capsys.readouterr().out
    assert KEEP_VIEW in out and "Model training" in KEEP_VIEW and out.count("workflowType=machine_learning") >= 2
