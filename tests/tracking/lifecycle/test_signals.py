"""Signals (tracking/lifecycle/signals.py) in a real process: SIGTERM ends a held run KILLED."""

import signal
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import ROOT
from tracking.lifecycle import signals


def _statuses():
    return [r.info.status for r in MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()])]


@pytest.mark.slow
def test_sigterm_ends_the_run_killed(tmp_path, tracking_uri):
    script = (
        "import os, signal, mlflow\n"
        "from tracking.lifecycle import runs, signals\n"
        "with signals.Interrupts().installed():\n"
        "    with runs.tracked_run(run_name='t'):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "Interrupted" in proc.stderr
    assert _statuses() == ["KILLED"]


def test_after_the_first_signal_the_other_is_ignored_and_the_same_again_interrupts():
    # Ctrl-C through `mlflow run`: the terminal's SIGINT, then mlflow run's SIGTERM whenever it
    # comes, even after training, while the run is being ended
    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    interrupts = signals.Interrupts()
    with interrupts.installed():
        with interrupts.deferred():
            signal.raise_signal(signal.SIGINT)  # during training: a flag, checked between batches
            assert interrupts()
        signal.raise_signal(signal.SIGTERM)  # ignored
        with pytest.raises(signals.Interrupted, match="again"):
            signal.raise_signal(signal.SIGINT)  # a second Ctrl-C stops at once
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before


def test_the_first_signal_outside_training_interrupts_at_once():
    with signals.Interrupts().installed(), pytest.raises(signals.Interrupted) as caught:
        signal.raise_signal(signal.SIGTERM)
    assert caught.value.signum == signal.SIGTERM
