import subprocess

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from mnist_mlflow.models import count_params
from tests.conftest import ROOT, tiny_run_config, use_fresh_store, use_store
from tracking import stage
from tracking.lifecycle import runs

# one worker under pytest-xdist (--dist loadgroup): the module-scoped run is trained once
pytestmark = pytest.mark.xdist_group("runs")
EPOCH_METRICS = {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "epoch_seconds"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist):
    """One tiny tracked run in a store of its own, for the tests that only read it."""
    root = tmp_path_factory.mktemp("logged-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # a tiny run lasts seconds
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
        use_fresh_store(root, mp)
        mlflow.set_experiment("test")
        outcome = runs.run_training(tiny_run_config(), mnist=mnist, progress=False)
        mlflow.set_tracking_uri(None)
    return root, outcome


@pytest.fixture
def logged_run(trained_run, monkeypatch):
    root, outcome = trained_run
    use_store(root, monkeypatch)
    yield outcome
    mlflow.set_tracking_uri(None)


def test_stage_run_logs_params_metrics_figures_and_model(logged_run, tiny_config, mnist):
    client = MlflowClient()
    run = client.get_run(logged_run.run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["stage"] == "stage3" and p["seed"] == "1" and p["augment.rotation_degrees"] == "6.9"
    assert int(p["num_params"]) == count_params(logged_run.result.model) <= 8000
    assert p["data.digest"] == mnist.digest and p["data.train_size"] == "2000"
    assert {"version.torch", "version.mlflow", "git_commit", "data.mean", "data.std"} <= set(p)
    assert EPOCH_METRICS | {"best_test_accuracy", "hold_epochs"} <= set(run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert any(k.startswith("system/cpu") for k in run.data.metrics)  # MLflow's system metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/curves.png", "figures/confusion_matrix.png", "figures/misclassified.png"} <= artifacts
    assert "summary.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "total parameters" in mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/model_summary.txt")
    contexts = {i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts == {"training", "testing"}


def test_logged_model_loads_and_predicts_on_raw_pixels(logged_run, mnist):
    uri = f"runs:/{logged_run.run_id}/model"
    x = mnist.test_x[:500, None].astype(np.float32)  # raw 0-255, the model contract
    expected = logged_run.result.model.cpu().eval()(torch.from_numpy(x)).argmax(1).numpy()
    module = mlflow.pytorch.load_model(uri)
    assert type(module).__name__ == type(logged_run.result.model).__name__  # pickle: the real class
    assert np.array_equal(module(torch.from_numpy(x)).argmax(1).numpy(), expected)
    pyfunc = mlflow.pyfunc.load_model(uri)
    scores = np.asarray(pyfunc.predict(x))
    assert scores.shape == (500, 10)
    assert np.array_equal(scores.argmax(1), expected)
    assert (scores.argmax(1) == mnist.test_y[:500]).mean() > 0.8
    assert pyfunc.metadata.get_input_schema().inputs[0].shape == (-1, 1, 28, 28)
    # pinned as MLflow's inference would, without our own package: on no index, it travels as code
    reqs = open(mlflow.pyfunc.get_model_dependencies(uri)).read().split()
    assert {r.split("==")[0] for r in reqs} == {"mlflow", "torch", "cloudpickle", "numpy", "pandas"}
    assert all("==" in r for r in reqs)


def _statuses():
    return [r.info.status for r in MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()])]


def test_crash_ends_failed_and_ctrl_c_ends_killed(mnist, tiny_config, tracking_uri):
    mlflow.set_experiment("test")

    def crash(_m):
        raise RuntimeError("boom")

    def ctrl_c(_m):
        raise KeyboardInterrupt

    with pytest.raises(RuntimeError):
        runs.run_training(tiny_config, mnist=mnist, on_epoch_end=crash, progress=False)
    with pytest.raises(KeyboardInterrupt):
        runs.run_training(tiny_config, mnist=mnist, on_epoch_end=ctrl_c, progress=False)
    assert sorted(_statuses()) == ["FAILED", "KILLED"]


def test_a_stop_run_ends_the_run_killed_once_and_without_an_error(mnist, tiny_config, tracking_uri):
    """What a pruned trial raises: the run is KILLED by the lifecycle itself, not re-ended."""
    mlflow.set_experiment("test")

    class Enough(runs.StopRun):
        pass

    def stop(_m):
        raise Enough("stopped on purpose")

    with pytest.raises(Enough) as info:
        runs.run_training(tiny_config, mnist=mnist, on_epoch_end=stop, progress=False)
    run = MlflowClient().get_run(info.value.run_id)
    assert run.info.status == "KILLED" and "error" not in run.data.tags
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "test_accuracy")] == [1]


@pytest.mark.parametrize("args, message", [
    (["--set", "schedule.name=cyclic"], "schedule.name='cyclic' is not allowed"),
    (["--epochs", "-1"], "optim.epochs=-1 is not allowed"),
    (["--set", "model.dropout=1.0"], "model.dropout=1.0 is not allowed"),
    (["--set", "augment.rotation_degrees=-3"], "augment.rotation_degrees=-3.0 is not allowed"),
    (["--set", "model.width1=12 model.width2=16"], "over the budget of 8,000"),
])
def test_bad_input_is_a_clear_error_and_creates_no_run(args, message, tracking_uri, capsys):
    assert stage.main([str(ROOT / "experiments/stage3.yaml"), "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err
    assert _statuses() == []


@pytest.mark.slow
def test_mlflow_run_stage1_end_to_end(tracking_uri, tmp_path):
    cmd = ["mlflow", "run", str(ROOT), "-e", "stage1", "--env-manager", "local",
           "--experiment-name", "e2e", "-P", "epochs=1", "-P", "train_limit=1000", "-P", "test_limit=300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["stage"] == "stage1"
    assert abs(run.data.metrics["pixel_mean"] - 0.1307) < 0.01  # of the 1,000 training images
    assert run.data.metrics["chosen_receptive_field"] == 5
    figs = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/samples.png", "figures/thickness.png", "figures/morphology.png",
            "figures/receptive_field_study.png", "figures/curves.png"} <= figs


def test_report_lists_finished_runs(logged_run, capsys):
    from tracking import report

    report.main(["--experiment", "test", "--stage", "stage3"])
    out = capsys.readouterr().out
    assert logged_run.run_id[:8] in out and "| stage3 | 1 | " in out
    with pytest.raises(SystemExit, match="no experiment named 'nope'"):
        report.rows("nope")


def test_unreachable_tracking_server_fails_fast_before_training(monkeypatch, tmp_path, capsys):
    import time

    from tests.services import free_port

    port = free_port()  # a loopback port with nothing listening
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        started = time.monotonic()
        assert stage.main([str(ROOT / "experiments/stage3.yaml"), "--epochs", "1"]) == 2
        assert time.monotonic() - started < 60
        assert f"tracking server http://127.0.0.1:{port} cannot be reached" in capsys.readouterr().err
    finally:
        mlflow.set_tracking_uri(None)


def test_each_tests_store_starts_without_the_last_stores_experiment(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    try:
        use_fresh_store(first, monkeypatch)
        mlflow.create_experiment("other")
        mlflow.set_experiment("earlier test")  # id 2: the next store has no such experiment
        use_fresh_store(second, monkeypatch)
        with mlflow.start_run() as run:
            pass
        assert run.info.experiment_id == "0"  # the new store's default experiment
    finally:
        mlflow.set_tracking_uri(None)


def test_each_tests_store_is_the_one_mlflow_makes_in_its_folder(tmp_path, monkeypatch):
    made, copied = tmp_path / "made", tmp_path / "copied"  # copied: conftest's migrated store
    made.mkdir(), copied.mkdir()
    try:
        monkeypatch.chdir(made)
        fresh = MlflowClient(f"sqlite:///{made}/mlflow.db").get_experiment("0")
        use_fresh_store(copied, monkeypatch)
        default = MlflowClient().get_experiment("0")
        assert default.name == fresh.name
        assert default.artifact_location == fresh.artifact_location.replace(str(made), str(copied))
        with mlflow.start_run() as run:
            mlflow.log_text("x", "x.txt")
        assert (copied / "mlruns/0" / run.info.run_id / "artifacts/x.txt").exists()
    finally:
        mlflow.set_tracking_uri(None)
