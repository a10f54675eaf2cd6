"""Signals (tracking/signals.py) in a real process: SIGTERM ends a held run KILLED."""

import subprocess
import sys

from mlflow import MlflowClient

from tests.conftest import ROOT


def _statuses():
    return [r.info.status for r in MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()])]


def test_sigterm_ends_the_run_killed(tmp_path, tracking_uri):
    script = (
        "import os, signal, mlflow\n"
        "from tracking import runs, signals\n"
        "with signals.sigterm_as_interrupt():\n"
        "    with runs.tracked_run(run_name='t'):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "Interrupted" in proc.stderr
    assert _statuses() == ["KILLED"]
