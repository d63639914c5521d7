"""``make ui``'s guidance (heatmapbench.app.ui): where the answer sits in MLflow's Model metrics tab."""

from __future__ import annotations


def test_chart_sections_follow_mlflows_rule_and_make_ui_says_where_the_answer_sits(tmp_path, capsys):
    from mlflow import MlflowClient

    from heatmapbench.app.ui import MODEL_METRICS, chart_sections, main

    keys = ["val/acc", "aopc/lrp", "aopc_rel/lrp", "aopc_rel/grad", "aopc_lo/lrp", "epoch", "eval/accuracy",
            "eval/random_ordering/aopc", "corr_pearson/aopc_rel/lrp", "system/cpu_utilization_percentage", "Train/loss"]
    # the prefix up to the last "/", by code point (upper case first), names without "/" last, system metrics apart
    assert chart_sections(keys) == ["Train", "aopc", "aopc_lo", "aopc_rel", "corr_pearson/aopc_rel", "eval",
                                    "eval/random_ordering", "val", MODEL_METRICS]

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    eid = client.create_experiment("train", artifact_location=str(tmp_path / "art"))
    run = client.create_run(eid, start_time=1_000).info.run_id
    for key in keys:
        client.log_metric(run, key, 0.5)
    client.create_run(eid, start_time=2_000)  # newer, without AOPC: the hint reads the run that has it
    assert main(["--tracking-uri", uri, "--port", "1"]) == 0
    out = capsys.readouterr().out
    assert "aopc_rel is section 4 of 9, val is section 8 of 9" in out and "type aopc_rel/ or val/ in" in out


def test_answer_first_sections_lead_with_the_unconfounded_measures():
    from heatmapbench.app.ui import MODEL_METRICS, SYSTEM_METRICS, answer_first_sections

    keys = ["aopc/lrp", "aopc_rel/lrp", "val/acc", "eval/accuracy", "corr_pearson/aopc_rel/lrp", "epoch",
            "system/cpu", "train/loss", "abpc/lrp"]
    assert answer_first_sections(keys) == [
        ("aopc_rel", True), ("val", True), ("eval", True), ("abpc", True),
        ("aopc", False), ("corr_pearson/aopc_rel", False), ("train", False), (MODEL_METRICS, False),
        (SYSTEM_METRICS, False)]
    # a ROAR experiment: the retrained accuracies first
    assert [s for s, is_open in answer_first_sections(["test/acc", "kar/lrp", "roar/lrp"]) if is_open] == ["roar", "kar"]


def test_make_ui_saves_the_answer_first_view_on_each_experiment_and_prints_its_link(tmp_path, capsys):
    import json

    from mlflow import MlflowClient

    from heatmapbench.app.ui import VIEW_NAME, VIEW_TAG, main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    eid = client.create_experiment("train", artifact_location=str(tmp_path / "art"))
    mine = '{"name": "mine", "createdAt": 1, "state": "{}"}'
    client.set_experiment_tag(eid, "mlflow.sharedViewState.mine", mine)  # a view the user saved
    client.create_experiment("empty", artifact_location=str(tmp_path / "art2"))
    run = client.create_run(eid).info.run_id
    for key in ["aopc/lrp", "aopc_rel/lrp", "val/acc"]:
        client.log_metric(run, key, 0.5, step=0)
    assert main(["--tracking-uri", uri, "--port", "1"]) == 0
    out = capsys.readouterr().out
    assert f"#/experiments/{eid}/runs?viewStateShareKey=heatmapbench-answer-first&compareRunsMode=CHART" in out

    def saved() -> tuple[dict, dict]:
        tags = client.get_experiment(eid).tags
        assert tags["mlflow.sharedViewState.mine"] == mine
        envelope = json.loads(tags[VIEW_TAG])
        return envelope, json.loads(envelope["state"])

    envelope, state = saved()
    assert envelope["name"] == VIEW_NAME and isinstance(envelope["createdAt"], int)
    assert state["isAccordionReordered"] is True and state["compareRunCharts"] == []
    assert [(s["name"], s["display"]) for s in state["compareRunSections"]] == [
        ("aopc_rel", True), ("val", True), ("aopc", False)]
    assert [e.name for e in client.search_experiments() if VIEW_TAG in e.tags] == ["train"]  # runs only

    assert main(["--tracking-uri", uri, "--port", "1"]) == 0  # nothing new: the tag is not rewritten
    assert saved()[0] == envelope
    client.log_metric(run, "eval/accuracy", 0.9, step=0)
    assert main(["--tracking-uri", uri, "--port", "1"]) == 0
    again, state = saved()
    assert again["createdAt"] == envelope["createdAt"]
    assert [s["name"] for s in state["compareRunSections"]] == ["aopc_rel", "val", "eval", "aopc"]


def test_a_store_that_refuses_the_view_still_gets_its_links(tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from heatmapbench.app.ui import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    eid = client.create_experiment("train", artifact_location=str(tmp_path / "art"))
    client.log_metric(client.create_run(eid).info.run_id, "aopc_rel/lrp", 0.5)

    def refuse(*args, **kwargs):
        raise MlflowException("permission denied\non this server")

    monkeypatch.setattr(MlflowClient, "set_experiment_tag", refuse)
    assert main(["--tracking-uri", uri, "--port", "1"]) == 0
    out = capsys.readouterr().out
    assert "note: could not save the answer-first chart view (MlflowException: permission denied on this server)" in out
    assert f"#/experiments/{eid}/runs?workflowType=machine_learning" in out and "viewStateShareKey" not in out


def test_a_view_too_large_for_one_tag_drops_closed_sections_from_the_end():
    import json

    from heatmapbench.app.ui import _MAX_TAG_VALUE, view_tag_value

    keys = ["aopc_rel/lrp", "val/acc"] + [f"section_{i:04d}_{'x' * 60}/m" for i in range(400)]
    value = view_tag_value(keys, 1, 2)
    sections = json.loads(json.loads(value)["state"])["compareRunSections"]
    assert len(value) <= _MAX_TAG_VALUE and 2 < len(sections) < 402
    assert [s["name"] for s in sections[:3]] == ["aopc_rel", "val", f"section_0000_{'x' * 60}"]
