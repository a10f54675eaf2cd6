import mlflow
from mlflow import MlflowClient

from tests.conftest import ROOT
from tracking import consistency


def test_seeds_run_nested_under_one_parent_with_summary(tracking_uri, capsys):
    args = [str(ROOT / "experiments/stage3.yaml"), "--seeds", "2", "--first-seed", "4", "--epochs", "1", "--train-limit", "1000",
            "--test-limit", "300", "--set", "optim.batch_size=32 optim.ema_decay=0.9 target.accuracy=20 target.hold=1",
            "--experiment", "c"]
    assert consistency.main(args) == 0
    client = MlflowClient()
    exp = client.get_experiment_by_name("c").experiment_id
    (parent,) = client.search_runs([exp], "tags.stage = 'stage3-consistency'")
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.params["seed"] for r in children) == ["4", "5"]
    assert parent.info.status == "FINISHED" and parent.data.metrics["seeds"] == 2
    # target 20% after one epoch of 32 steps (a short average: 0.998 would still be mostly the
    # first steps' weights): both hold
    assert parent.data.metrics["seeds_holding"] == 2
    assert "figures/seeds.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "2 of 2 seeds held" in capsys.readouterr().out


def test_zero_seeds_is_refused_before_any_run(tracking_uri, capsys):
    assert consistency.main([str(ROOT / "experiments/stage3.yaml"), "--seeds", "0"]) == 2
    assert "--seeds='0' is not allowed" in capsys.readouterr().err
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_a_negative_first_seed_is_refused_before_any_run(tracking_uri, capsys):
    assert consistency.main([str(ROOT / "experiments/stage3.yaml"), "--first-seed", "-1"]) == 2
    assert "--first-seed='-1' is not allowed" in capsys.readouterr().err
    assert mlflow.search_runs(search_all_experiments=True).empty
