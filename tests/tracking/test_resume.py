import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mnist_mlflow import config as C
from tests.conftest import ROOT
from tracking import checkpoints, runs, stage

EPOCHS = 6  # enough that Ctrl-C lands mid-run: an epoch of 3,000 images takes about a second
ARGS = ["--epochs", str(EPOCHS), "--train-limit", "3000", "--test-limit", "300", "--set", "optim.batch_size=32",
        "--experiment", "resume", "--no-progress"]


def history(run_id: str, key: str = "test_accuracy") -> list[tuple[int, float]]:
    # an epoch interrupted between its metrics and its checkpoint runs again and logs the same
    # values at the same step once more: compare the distinct (step, value) pairs
    return sorted({(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)})


def only_run(status: str) -> str:
    exp = MlflowClient().get_experiment_by_name("resume").experiment_id
    found = MlflowClient().search_runs([exp], f"attributes.status = '{status}'")
    assert len(found) == 1, [r.info.status for r in found]
    return found[0].info.run_id


def test_interrupted_run_resumes_in_the_same_run_to_the_uninterrupted_result(tracking_uri, capsys):
    # threads: auto, as users run it; the resume must reuse the count the run resolved, and an
    # uninterrupted run with that count (given explicitly) is the reference
    config = str(ROOT / "experiments/stage3.yaml")
    mlflow.set_experiment("resume")  # the store exists before another process opens it
    proc = subprocess.Popen([sys.executable, "-m", "tracking.stage", config, *ARGS], cwd=os.getcwd(),
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait for the run's first checkpoint (logged after that epoch's metrics), then press
    # Ctrl-C; the file system is watched, not the store: a query can outlast the remaining epochs
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if list(Path.cwd().glob("mlruns/*/*/artifacts/checkpoint/last.pt")):
            break
        time.sleep(0.02)
    # no waiting for the copy to finish: the run defers the signal to its next batch
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    interrupted = only_run("KILLED")
    assert len(history(interrupted)) < EPOCHS  # stopped before the end
    params = MlflowClient().get_run(interrupted).data.params
    assert params["threads"] == "auto" and int(params["threads_resolved"]) >= 1

    assert stage.main(["--resume", interrupted, "--no-progress"]) == 0
    run = MlflowClient().get_run(interrupted)
    assert run.info.status == "FINISHED"
    assert stage.main([config, *ARGS, "--set", f"threads={params['threads_resolved']}"]) == 0
    reference = next(r.info.run_id for r in MlflowClient().search_runs(
        [run.info.experiment_id], "attributes.status = 'FINISHED'") if r.info.run_id != interrupted)
    for key in ("test_accuracy", "train_loss", "lr"):
        assert history(interrupted, key) == history(reference, key)
    assert run.data.metrics["best_test_accuracy"] == MlflowClient().get_run(reference).data.metrics["best_test_accuracy"]
    assert mlflow.pytorch.load_model(f"runs:/{interrupted}/model") is not None  # model logged at the end


def test_resume_refuses_finished_runs_and_runs_without_checkpoint(tracking_uri, mnist, tiny_config, capsys):
    mlflow.set_experiment("resume")
    finished = runs.run_training(C.replace(tiny_config, {"optim.epochs": 1}), mnist=mnist, progress=False)
    assert stage.main(["--resume", finished.run_id]) == 2
    assert "is FINISHED: nothing to resume" in capsys.readouterr().err

    with pytest.raises(KeyboardInterrupt):
        runs.run_training(tiny_config, mnist=mnist, progress=False,  # no checkpoints asked for
                          on_epoch_end=lambda m: (_ for _ in ()).throw(KeyboardInterrupt()))
    killed = only_run("KILLED")
    assert stage.main(["--resume", killed]) == 2
    assert "has no checkpoint/last.pt to resume from" in capsys.readouterr().err
    assert stage.main(["--resume", killed, "--epochs", "5"]) == 2
    assert "drop the overrides" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_logging_waits_for_the_checkpoint(tracking_uri, mnist, tiny_config, signum):
    # the signal arrives while epoch 1's metrics are being logged: the run still logs that
    # epoch's checkpoint, then stops at the next batch, KILLED, resumable from epoch 1
    mlflow.set_experiment("resume")
    cfg = C.replace(tiny_config, {"optim.epochs": 3})
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs in the background
    with pytest.raises(KeyboardInterrupt):
        runs.run_training(cfg, mnist=mnist, progress=False, checkpoints=True,
                          on_epoch_end=lambda m: os.kill(os.getpid(), signum) if m.epoch == 1 else None)
    killed = only_run("KILLED")
    assert [s for s, _ in history(killed)] == [1]
    assert checkpoints.load_checkpoint(killed)["epoch"] == 1
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored
