import re

import mlflow
import pytest

from tracking import report


def log_run(experiment, seed, precision, threads, curve, status="FINISHED"):
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        mlflow.log_params({"stage": "stage3", "seed": seed, "precision": precision,
                           "threads_resolved": threads, "target.accuracy": 99.4, "target.hold": 4})
        for step, acc in enumerate(curve, 1):
            mlflow.log_metrics({"test_accuracy": acc, "epoch_seconds": 10.0}, step=step)
        mlflow.log_metric("best_test_accuracy", max(curve))
    if status != "FINISHED":
        mlflow.MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_report_groups_runs_by_precision_and_threads_and_draws_one_panel_each(tracking_uri, tmp_path, capsys):
    held = log_run("a", 1, "fp32", 1, [99.0, 99.41, 99.45, 99.42, 99.44, 99.30])
    log_run("a", 2, "fp32", 1, [99.0, 99.41, 99.45, 99.39, 99.44, 99.45])  # 3 epochs at most: no hold
    log_run("b", 1, "bf16", 2, [99.5, 99.5, 99.5, 99.6])
    log_run("b", 3, "bf16", 2, [99.5] * 5, status="KILLED")  # not finished: left out
    png = tmp_path / "curves.png"
    assert report.main(["--experiment", "a", "--experiment", "b", "--figure", str(png)]) == 0
    out = capsys.readouterr().out
    assert f"| {held[:8]} | stage3 | 1 | fp32 | 1 | " in out
    assert "| 99.30 | 5 | 99.41 | 4 | 50 |" in out  # final, hold completed at 5, its lowest epoch, longest, seconds
    assert "fp32, 1 thread(s): 1 of 2 runs held, completed at epochs 5-5 (mean 5.0); final 99.38 +- 0.08% (min 99.30%)" in out
    assert "bf16, 2 thread(s): 1 of 1 runs held, completed at epochs 4-4 (mean 4.0)" in out
    assert out.count("\n| ") == 3  # the 3 finished runs (the header opens the output)
    assert png.stat().st_size > 10_000
    fig = report.figure(report.rows(["a", "b"]))
    assert [ax.get_title() for ax in fig.axes] == ["bf16, 2 thread(s): 1 of 1 held", "fp32, 1 thread(s): 1 of 2 held"]


@pytest.mark.parametrize("name, message", [
    ("missing/curves.png", "its folder .*missing' does not exist"),
    ("curves.txt", r"a file name ending in one of .*\.png"),
    ("curves", r"a file name ending in one of .*\.png"),
])
def test_a_bad_figure_path_is_one_line_exit_2_before_any_query(tracking_uri, tmp_path, capsys, name, message):
    log_run("a", 1, "fp32", 1, [99.0, 99.5])
    assert report.main(["--experiment", "a", "--figure", str(tmp_path / name)]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if " INFO mlflow" not in line]
    assert captured.out == "" and len(lines) == 1 and re.search(f"^error: --figure=.*{message}", lines[0])
    assert not (tmp_path / name).exists()
