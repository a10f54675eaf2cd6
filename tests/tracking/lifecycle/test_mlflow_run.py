"""The keeper that puts KILLED back after `mlflow run` writes FAILED over it: real processes, a real store.

A stand-in plays `mlflow run` (a process that exits when told), so each step happens in the
order the test chooses; tests/tracking/test_stage.py drives the real `mlflow run` for a stage,
the last test here for search, confirm and tune, side by side.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT, migrated_store
from tests.tracking.search.helpers import ROTATION, write_search
from tests.tracking.test_stage import default_sigint
from tracking.lifecycle import mlflow_run
from tracking.search.study import open_storage

pytestmark = pytest.mark.slow  # each test starts a keeper process beside a stand-in


@pytest.fixture
def stand_in(tracking_uri, monkeypatch):
    """A process in the place of `mlflow run`; it exits once its stdin is closed."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the keeper imports this checkout's tracking
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc
    proc.kill()
    proc.wait()


def new_run() -> str:
    client = MlflowClient()
    return client.create_run(client.create_experiment("keeper")).info.run_id


def test_the_keeper_puts_killed_back_once_mlflow_run_has_exited(stand_in):
    run_id = new_run()
    keeper, report = mlflow_run.start_keeper(run_id, stand_in.pid)
    MlflowClient().set_terminated(run_id, "KILLED")  # our command's end of the run
    os.write(report, b"KILLED\n")
    os.close(report)  # our command has exited
    MlflowClient().set_terminated(run_id, "FAILED")  # mlflow run's, over ours, before it exits
    stand_in.stdin.close()
    stand_in.wait()
    assert keeper.wait(timeout=600) == 0
    assert MlflowClient().get_run(run_id).info.status == "KILLED"


def test_without_a_report_the_keeper_leaves_mlflow_runs_status(stand_in):
    run_id = new_run()
    keeper, report = mlflow_run.start_keeper(run_id, stand_in.pid)
    os.close(report)  # our command died before it could say (SIGKILL, the OOM killer)
    MlflowClient().set_terminated(run_id, "FAILED")
    stand_in.stdin.close()
    stand_in.wait()
    assert keeper.wait(timeout=600) == 0
    assert MlflowClient().get_run(run_id).info.status == "FAILED"


def test_the_keeper_idles_without_mlflow():
    """It waits through a whole training: judged by liveness's process rule, without MLflow loaded."""
    probe = ("import sys, tracking.lifecycle.mlflow_run; "
             "print(sorted(m for m in ('mlflow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- the real `mlflow run`, Ctrl-C

QUICK = "data.val_size=500 device=cpu optim.batch_size=32 optim.ema_decay=0.9"
EPOCHS = 30  # far more than any training gets to before its Ctrl-C


def start_entry(entry: str, folder: Path, params: dict) -> subprocess.Popen:
    """`mlflow run . -e ENTRY` into experiment e2e of a store of its own in `folder`, in a
    session of its own (a terminal's foreground group, which Ctrl-C reaches whole)."""
    folder.mkdir()
    shutil.copyfile(migrated_store(), folder / "mlflow.db")
    uri = f"sqlite:///{folder}/mlflow.db"
    MlflowClient(uri).create_experiment("e2e", artifact_location=(folder / "mlruns").as_uri())
    cmd = ["mlflow", "run", str(ROOT), "-e", entry, "--env-manager", "local", "--experiment-name", "e2e"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    with open(folder / "mlflow-run.log", "w") as log:  # a pipe could fill up
        return subprocess.Popen(cmd, cwd=folder, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                      "MLFLOW_TRACKING_URI": uri},
                                stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=default_sigint)


def ctrl_c_once_training(procs: dict[str, subprocess.Popen], trainings: dict[str, int], root: Path,
                         timeout: float = 600) -> None:
    """Ctrl-C to each `mlflow run` once all its trainings have begun: their runs have logged
    model_summary.txt, just before the first epoch (the files are polled: the stores are busy)."""
    pending = dict(procs)
    deadline = time.monotonic() + timeout
    while pending:
        for entry, proc in list(pending.items()):
            begun = len(list((root / entry / "mlruns").glob("**/artifacts/model_summary.txt")))
            if begun >= trainings[entry]:
                os.killpg(proc.pid, signal.SIGINT)
                del pending[entry]
            elif proc.poll() is not None or time.monotonic() > deadline:
                log = (root / entry / "mlflow-run.log").read_text()[-3000:]
                pytest.fail(f"{entry}: {begun} of {trainings[entry]} trainings begun (rc {proc.poll()}):\n{log}")
        time.sleep(0.1)


def statuses_once_settled(uri: str, timeout: float = 60) -> dict[str, str]:
    """Run id -> status, once none is RUNNING or FAILED (the keeper puts KILLED back only after
    `mlflow run` has exited), or as they are after `timeout`."""
    client = MlflowClient(uri)
    deadline = time.monotonic() + timeout
    while True:
        found = {r.info.run_id: r.info.status for e in client.search_experiments()
                 for r in client.search_runs([e.experiment_id])}
        if not {"RUNNING", "FAILED"} & set(found.values()) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_ctrl_c_to_mlflow_run_leaves_search_confirm_and_tune_killed_with_their_runs(tmp_path, tracking_uri):
    """Each entry point takes `mlflow run`'s run as stage does (mlflow_run.run_entry_point): after
    a Ctrl-C in training, that run and every run under it end KILLED, not FAILED nor RUNNING. The
    three run side by side, each on a store of its own."""
    config = write_search(tmp_path, ROTATION)  # one worker, no incumbent, one seed a trial
    quick = {"config": config, "epochs": EPOCHS, "train_limit": 1500, "test_limit": 300, "set": QUICK}
    confirm_storage = f"journal:{tmp_path}/confirm.log"
    optuna.create_study(study_name="confirm", storage=open_storage(confirm_storage))  # no trial: the base alone
    entries = {  # entry point: its -P values, its trainings at once, its runs (the parent's included)
        "search": ({**quick, "n_trials": 2, "workers": 2, "storage": f"sqlite:///{tmp_path}/search.db",
                    "study_name": "search"}, 2, 3),
        "confirm": ({**quick, "storage": confirm_storage, "study_name": "confirm", "top": 1, "seeds": 1,
                     "precisions": "fp32", "threads": 1, "final_seeds": 1, "final_precisions": "fp32"}, 1, 2),
        "tune": ({**quick, "n_trials": 1, "storage": f"sqlite:///{tmp_path}/tune.db",
                  "study_name": "tune", "probe_batches": 4, "seeds": 1}, 1, 3),  # tune, its search step, the trial
    }
    procs = {entry: start_entry(entry, tmp_path / entry, params) for entry, (params, _, _) in entries.items()}
    try:
        ctrl_c_once_training(procs, {entry: n for entry, (_, n, _) in entries.items()}, tmp_path)
        for proc in procs.values():
            proc.wait(timeout=600)
    finally:
        for proc in procs.values():  # whatever is left of a failed test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    for entry, (_, _, n_runs) in entries.items():
        log = (tmp_path / entry / "mlflow-run.log").read_text()
        assert procs[entry].returncode != 0, log[-3000:]
        assert "interrupted, cancelling run" in log  # mlflow run took its part: SIGTERM, then FAILED
        found = statuses_once_settled(f"sqlite:///{tmp_path / entry}/mlflow.db")
        assert list(found.values()) == ["KILLED"] * n_runs, (entry, found, log[-3000:])
