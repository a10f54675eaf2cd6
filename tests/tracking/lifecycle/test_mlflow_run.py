"""The keeper that puts KILLED back after `mlflow run` writes FAILED over it: real processes, a real store.

A stand-in plays `mlflow run` (a process that exits when told), so each step happens in the
order the test chooses; tests/tracking/test_stage.py drives the real `mlflow run`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT
from tracking.lifecycle import mlflow_run

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
