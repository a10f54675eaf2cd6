"""The stage CLI and `mlflow run`: bad input, interrupts and resume with real processes and stores."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.mnist_mlflow.test_data import write_idx_dir
from tracking import stage

STAGE3 = str(ROOT / "experiments/stage3.yaml")
TINY = ["--epochs", "1", "--train-limit", "500", "--test-limit", "100", "--no-progress"]
# the signal follows epoch 1's checkpoint within a poll (0.05 s); 3 epochs of 2,000 images are
# left for it to land mid-run
EPOCHS = 4
LONG = ["--epochs", str(EPOCHS), "--train-limit", "2000", "--test-limit", "300",
        "--set", "optim.batch_size=32", "--experiment", "sig", "--no-progress"]


def our_lines(err: str) -> list[str]:
    """stderr without MLflow's own log lines (e.g. "Creating initial MLflow database tables")."""
    return [line for line in err.strip().splitlines() if " INFO mlflow" not in line]


def all_runs():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def wait_for_checkpoint(proc: subprocess.Popen, root: Path, timeout: float = 900) -> None:
    """Until the first checkpoint file exists (the store is not polled: it is busy)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if list(root.glob("**/artifacts/checkpoint/last.pt")):
            return
        time.sleep(0.05)
    logs = "".join(p.read_text()[-2000:] for p in root.glob("mlflow-run-*.log"))
    pytest.fail(f"no checkpoint within {timeout} s or before the process ended (rc {proc.poll()}): {logs}")


# ---------------------------------------------------------------- bad input, before any run

def test_an_idx_data_dir_gives_a_finished_tracked_run(tracking_uri, tmp_path, mnist):
    folder = tmp_path / "idx"
    folder.mkdir()
    write_idx_dir(folder, mnist)
    assert stage.main([STAGE3, *TINY, "--data-dir", str(folder), "--experiment", "idx"]) == 0
    (run,) = all_runs()
    assert run.info.status == "FINISHED"
    assert run.data.params["data.source"] == f"idx:{folder.resolve()}"
    assert run.data.params["data.digest"] == mnist.digest
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"mnist-train", "mnist-test"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_refused_before_any_run(tracking_uri, capsys):
    assert stage.main([STAGE3, *TINY, "--set", "device=cuda"]) == 2
    assert "device=cuda was asked for, but CUDA is not available" in capsys.readouterr().err
    assert all_runs() == []


@pytest.mark.parametrize("text, message", [
    ("optim: {lr: [0.1\n", "line 2: not valid YAML"),
    ("- 1\n", "must hold a mapping of settings, not a list"),
    ("seed: !!python/object/apply:os.getpid []\n", "line 1: not valid YAML"),
])
def test_yaml_errors_are_one_line_and_exit_2(tracking_uri, tmp_path, capsys, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    assert stage.main([str(tmp_path / "bad.yaml"), *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and len(our_lines(err)) == 1
    assert stage.main([str(tmp_path), *TINY]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_non_finite_values_are_refused_and_a_diverging_run_ends_failed(tracking_uri, capsys):
    assert stage.main([STAGE3, *TINY, "--set", "schedule.max_lr=.inf"]) == 2
    assert "schedule.max_lr=inf is not allowed: a finite number" in capsys.readouterr().err
    assert all_runs() == []

    assert stage.main([STAGE3, *TINY, "--set", "schedule.name=none optim.name=sgd optim.lr=1.0e+30"]) == 1
    err = capsys.readouterr().err
    (run,) = all_runs()
    assert run.info.status == "FAILED"
    assert "training diverged in epoch 1" in run.data.tags["error"]
    assert f"run {run.info.run_id} is FAILED" in err and "Traceback" not in err


def test_check_validates_without_creating_a_run(tracking_uri, capsys):
    assert stage.main([STAGE3, *TINY, "--check"]) == 0
    assert capsys.readouterr().out.startswith("ok: stage3")
    assert stage.main([STAGE3, *TINY, "--check", "--epochs", "-1"]) == 2
    assert all_runs() == []


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1", "4294967296"])
def test_a_seed_out_of_range_is_refused_by_check_before_any_run(tracking_uri, capsys, seed):
    # 1e20 passed --check, then torch.manual_seed raised an OverflowError traceback
    for extra in (["--check"], []):
        assert stage.main([STAGE3, *TINY, "--seed", seed, *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if " INFO mlflow" not in line]
        assert err == [f"error: seed={seed} is not allowed: an integer from 0 to 4294967295"]
    assert all_runs() == []


# ---------------------------------------------------------------- the store, checked up front

def test_a_silent_tracking_server_fails_within_seconds(monkeypatch, tmp_path, capsys):
    listener = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        started = time.monotonic()
        assert stage.main([STAGE3, *TINY]) == 2
        assert time.monotonic() - started < 30
        err = capsys.readouterr().err
        assert f"tracking server {uri} cannot be reached" in err and len(our_lines(err)) == 1
    finally:
        mlflow.set_tracking_uri(None)
        listener.close()


@pytest.mark.parametrize("uri, message", [
    ("sqlite:////sys/mlflow.db", "is not writable here"),  # a new store in a read-only folder
    ("sqlite:////proc/version", "is not writable here"),  # an existing file that cannot be written
    ("sqlite:///{tmp}/missing-folder/mlflow.db", "does not exist"),  # never made by the test
])
def test_an_unusable_sqlite_store_is_one_line_within_seconds(monkeypatch, tmp_path, capsys, uri, message):
    uri = uri.format(tmp=tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        started = time.monotonic()
        assert stage.main([STAGE3, *TINY]) == 2
        assert time.monotonic() - started < 30
        err = capsys.readouterr().err
        assert message in err and len(our_lines(err)) == 1
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_processes_starting_on_one_new_store_do_not_race_its_creation(tmp_path):
    uri = f"sqlite:///{tmp_path}/race.db"
    cmd = [sys.executable, "-m", "tracking.stage", STAGE3, *TINY, "--experiment", "race"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env={**env(), "MLFLOW_TRACKING_URI": uri},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in outs]


# ---------------------------------------------------------------- interrupts, real processes

@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_prints_its_id_state_and_resume_command(tracking_uri, signum):
    proc = subprocess.Popen([sys.executable, "-m", "tracking.stage", STAGE3, *LONG], cwd=os.getcwd(),
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, Path.cwd())
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    (run,) = all_runs()
    assert proc.returncode == 128 + signum
    assert run.info.status == "KILLED"
    assert err.strip().splitlines()[-1] == (
        f"interrupted: run {run.info.run_id} is KILLED; resume it with: "
        f"python -m tracking.stage --resume {run.info.run_id}")
    assert "Traceback" not in err


def default_sigint() -> None:
    """Ctrl-C as in a terminal, also where pytest itself ignores SIGINT (a script's background
    job): Python would then leave it ignored in `mlflow run`, which would not take part."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def mlflow_run(tracking_uri):
    """Starts `mlflow run . -e stage3` in experiment e2e (created here: the store is migrated once,
    in this process); whatever is left of it is killed at the end of the test."""
    MlflowClient().create_experiment("e2e", artifact_location=(Path.cwd() / "mlruns").as_uri())
    started = []

    def start(params: list[str], **kwargs) -> subprocess.Popen:
        cmd = ["mlflow", "run", str(ROOT), "-e", "stage3", "--env-manager", "local",
               "--experiment-name", "e2e"]
        for p in params:
            cmd += ["-P", p]
        with open(Path.cwd() / f"mlflow-run-{len(started)}.log", "w") as log:  # a pipe could fill up
            proc = subprocess.Popen(cmd, cwd=os.getcwd(), env=env(), stdout=log,
                                    stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint,
                                    **kwargs)
        started.append(psutil.Process(proc.pid))
        return proc

    yield start
    for parent in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            for p in [*parent.children(recursive=True), parent]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()


MLFLOW_RUN_LONG = [f"epochs={EPOCHS}", "train_limit=2000", "test_limit=300", "set=optim.batch_size=32"]


@pytest.mark.slow
def test_bad_mlflow_run_params_leave_the_run_failed_with_the_reason(mlflow_run):
    proc = mlflow_run(["epochs=-1"])
    proc.communicate(timeout=900)
    assert proc.returncode != 0
    (run,) = all_runs()
    assert run.info.status == "FAILED"
    assert "optim.epochs=-1 is not allowed" in run.data.tags["error"]


@pytest.mark.slow
def test_ctrl_c_to_mlflow_run_leaves_the_run_killed_and_resume_finds_its_experiment(mlflow_run):
    proc = mlflow_run(MLFLOW_RUN_LONG, start_new_session=True)  # a group of its own, as a terminal's
    wait_for_checkpoint(proc, Path.cwd())
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    proc.communicate(timeout=600)
    (run,) = all_runs()
    run_id = run.info.run_id
    # mlflow run marks it FAILED as it exits; the keeper puts KILLED back once it has
    deadline = time.monotonic() + 600
    while MlflowClient().get_run(run_id).info.status != "KILLED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert MlflowClient().get_run(run_id).info.status == "KILLED"
    log = (Path.cwd() / "mlflow-run-0.log").read_text()
    assert "interrupted, cancelling run" in log  # mlflow run took its part: SIGTERM after the SIGINT
    assert f"interrupted: run {run_id} is KILLED; resume it with" in log
    # in this process: it has none of mlflow run's settings either (MLFLOW_RUN_ID, _EXPERIMENT_ID)
    assert stage.main(["--resume", run_id, "--no-progress"]) == 0
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    # nothing made on the side (Default is the store's own: MLflow makes it in every SQL store)
    assert {e.name for e in MlflowClient().search_experiments()} == {"Default", "e2e"}
    steps = {m.step for m in MlflowClient().get_metric_history(run_id, "test_accuracy")}
    assert steps == set(range(1, EPOCHS + 1))


@pytest.mark.slow
def test_sigterm_to_mlflow_run_stops_the_training(mlflow_run):
    proc = mlflow_run(MLFLOW_RUN_LONG)
    wait_for_checkpoint(proc, Path.cwd())
    children = psutil.Process(proc.pid).children(recursive=True)  # the training and its keeper
    assert children, "mlflow run has no training child"
    proc.send_signal(signal.SIGTERM)  # to `mlflow run` alone
    proc.communicate(timeout=600)
    gone, alive = psutil.wait_procs(children, timeout=600)
    assert not alive, f"outlived mlflow run: {[p.cmdline() for p in alive]}"
    (run,) = all_runs()  # its status is final: no process is left to write it
    assert run.info.status == "KILLED"
    assert f"run {run.info.run_id} is KILLED; resume it with" in (Path.cwd() / "mlflow-run-0.log").read_text()
    steps = {m.step for m in MlflowClient().get_metric_history(run.info.run_id, "test_accuracy")}
    assert len(steps) < EPOCHS  # stopped, not trained to the end
    assert "checkpoint/last.pt" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "checkpoint")}
