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
