import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from mnist_mlflow import config as C
from tests.conftest import ROOT
from tracking import stage
from tracking.lifecycle import checkpoints, runs

# Ctrl-C follows epoch 1's checkpoint within a poll (0.02 s); 3 epochs of 2,000 images are left
# for it to land mid-run
EPOCHS = 4
ARGS = ["--epochs", str(EPOCHS), "--train-limit", "2000", "--test-limit", "300", "--set", "optim.batch_size=32",
        "--experiment", "resume", "--no-progress"]


def history(run_id: str, key: str = "test_accuracy") -> list[tuple[int, float]]:
    # distinct (step, value) pairs; that each epoch is logged once is tested below (`steps`)
    return sorted({(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)})


def only_run(status: str) -> str:
    exp = MlflowClient().get_experiment_by_name("resume").experiment_id
    found = MlflowClient().search_runs([exp], f"attributes.status = '{status}'")
    assert len(found) == 1, [r.info.status for r in found]
    return found[0].info.run_id


@pytest.mark.slow
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


# ---------------------------------------------------------------- each epoch once; faults in one line

SMALL = ["--epochs", "3", "--train-limit", "2000", "--test-limit", "500", "--set", "optim.batch_size=32",
         "--set", "threads=1", "--set", "device=cpu", "--experiment", "resume", "--no-progress"]


def steps(run_id: str) -> list[int]:
    """Every logged step of test_accuracy, duplicates included."""
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, "test_accuracy"))


def error_lines(err: str) -> list[str]:
    """stderr without MLflow's log lines and its download progress bar."""
    return [line for line in err.splitlines()
            if line.strip() and " INFO mlflow" not in line and not line.startswith("Downloading artifacts")]


def fail_at_epoch_2(monkeypatch, name: str, exc: BaseException):
    """`runs.<name>` raises `exc` for epoch 2: a kill or a full disk at that point of the epoch."""
    real = getattr(runs, name)

    def faulty(arg):
        epoch = arg["epoch"] if isinstance(arg, dict) else arg.epoch
        if epoch == 2:
            raise exc
        return real(arg)

    monkeypatch.setattr(runs, name, faulty)
    return real


@pytest.mark.parametrize("where", ["log_checkpoint", "log_epoch"])
def test_a_run_killed_inside_an_epochs_logging_resumes_with_each_epoch_once(
        tracking_uri, mnist, tiny_config, monkeypatch, where):
    # log_checkpoint: killed after epoch 2's metrics were due and before its checkpoint (it used to
    # log them, then the resume logged epoch 2 again: steps 1, 2, 2, 3); log_epoch: killed after
    # the checkpoint, before the metrics (the resume logs them from the checkpoint's history)
    mlflow.set_experiment("resume")
    cfg = C.replace(tiny_config, {"optim.epochs": 3})
    real = fail_at_epoch_2(monkeypatch, where, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        runs.run_training(cfg, mnist=mnist, progress=False, checkpoints=True)
    monkeypatch.setattr(runs, where, real)
    killed = only_run("KILLED")
    runs.run_training(cfg, mnist=mnist, progress=False, resume_run_id=killed, log_model_artifact=False)
    assert steps(killed) == [1, 2, 3]
    logged = {m.step: m.value for m in MlflowClient().get_metric_history(killed, "test_accuracy")}
    last = mlflow.artifacts.download_artifacts(run_id=killed, artifact_path="checkpoint/last.pt")
    assert [logged[e] for e in (1, 2, 3)] == [h["test_accuracy"] for h in
                                               torch.load(last, weights_only=True)["history"]]


def test_a_full_disk_ends_the_run_failed_in_one_line_and_the_resume_clears_its_error(
        tracking_uri, monkeypatch, capsys):
    config = str(ROOT / "experiments/stage3.yaml")
    real = fail_at_epoch_2(monkeypatch, "log_checkpoint", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert stage.main([config, *SMALL]) == 2
    failed = only_run("FAILED")
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"error: OSError: [Errno 28] No space left on device; run {failed} is FAILED; "
                     f"resume it with: python -m tracking.stage --resume {failed}"]
    assert "No space left on device" in MlflowClient().get_run(failed).data.tags["error"]

    monkeypatch.setattr(runs, "log_checkpoint", real)  # space again
    assert stage.main(["--resume", failed, "--no-progress"]) == 0
    run = MlflowClient().get_run(failed)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags  # no stale error
    assert steps(failed) == [1, 2, 3]


class _Payload:
    def __reduce__(self):
        return os.system, ("touch pwned",)


@pytest.mark.parametrize("content, message", [
    ("truncated", "is truncated or not a checkpoint"),
    ("crafted", "is truncated or not a checkpoint"),
    ("other keys", "is not a checkpoint of this project (it lacks"),
])
def test_an_unloadable_checkpoint_is_one_line_exit_2_and_leaves_the_run_as_it_was(
        tracking_uri, mnist, tiny_config, tmp_path, capsys, content, message):
    mlflow.set_experiment("resume")
    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C during epoch 1 leaves epoch 1's checkpoint
        runs.run_training(C.replace(tiny_config, {"optim.epochs": 3}), mnist=mnist, progress=False,
                          checkpoints=True,
                          on_epoch_end=lambda m: os.kill(os.getpid(), signal.SIGINT) if m.epoch == 1 else None)
    killed = only_run("KILLED")
    bad = tmp_path / "bad" / checkpoints.CHECKPOINT_FILE
    bad.parent.mkdir()
    if content == "truncated":  # as a full disk leaves it
        good = Path(mlflow.artifacts.download_artifacts(run_id=killed, artifact_path="checkpoint/last.pt"))
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        torch.save(_Payload() if content == "crafted" else {"epoch": 1, "model": {}}, bad)
    MlflowClient().log_artifact(killed, str(bad), checkpoints.CHECKPOINT_DIR)
    capsys.readouterr()
    for extra in ([], ["--check"]):
        assert stage.main(["--resume", killed, "--no-progress", *extra]) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and f"run {killed}'s checkpoint/last.pt" in lines[0] and message in lines[0]
    assert MlflowClient().get_run(killed).info.status == "KILLED"
    assert not (Path.cwd() / "pwned").exists()
