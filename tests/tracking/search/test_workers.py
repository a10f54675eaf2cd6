"""Search workers (tracking/search/workers.py, local.py, study.RetryAndCloseRun): a dead
worker's trial is failed, retried with its params, and its run closed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import psutil
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT
from tests.tracking.search.helpers import ROTATION, child_runs, shared, write_search
from tracking.search import names as N
from tracking.search import study as search_study
from tracking.search.run import run_search
from tracking.search.trial_runs import TrialRuns


@pytest.mark.slow  # an end-to-end chain of several trainings: the whole suite runs it
def test_a_dead_workers_trial_is_failed_retried_and_its_run_closed(tmp_path, mnist, tracking_uri):
    """A trial left RUNNING by a worker that vanished (its heartbeat stopped): the next worker
    fails it after 3 heartbeats, runs it again with its params, and ends its MLflow run FAILED."""
    config = write_search(tmp_path, ROTATION)
    opts = shared(tmp_path, config, study_trials=2, heartbeat=1)
    first = run_search(shared(tmp_path, config, study_trials=1, heartbeat=1), mnist=mnist)

    # The vanished worker: its trial started, its run exists, then silence.
    storage = search_study.open_storage(opts.storage, heartbeat_s=1)
    study = optuna.load_study(study_name=opts.study_name, storage=storage)
    dead = study.ask({"augment.rotation_degrees": optuna.distributions.FloatDistribution(0, 15)})
    runs = TrialRuns(first.parent_run_id, mlflow.get_experiment_by_name("search-test").experiment_id,
                     opts.study_name, "search", "gone-host:1")
    for key, value in {N.PARENT_ATTR: runs.parent_run_id, N.EXPERIMENT_ATTR: runs.experiment_id,
                       N.WORKER_ATTR: runs.worker}.items():
        dead.set_user_attr(key, value)
    dead_run = mlflow.MlflowClient().create_run(runs.experiment_id, tags=runs.tags(dead.number, "RUNNING"))
    storage.record_heartbeat(dead._trial_id)
    time.sleep(3.5)  # 3 heartbeats of 1 s

    result = run_search(opts, mnist=mnist)

    trials = {t.number: t for t in result.study.trials}
    assert trials[dead.number].state == TrialState.FAIL
    (retry,) = [t for t in trials.values() if t.system_attrs.get("failed_trial") == dead.number]
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == dead.number
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert retry.user_attrs["retry_of"] == dead.number
    assert sum(t.state == TrialState.COMPLETE for t in trials.values()) == 2
    closed = mlflow.get_run(dead_run.info.run_id)
    assert closed.info.status == "FAILED" and closed.data.tags["trial_state"] == "FAIL"
    assert "worker gone-host:1 lost: no heartbeat for 3 s; queued again" == closed.data.tags["error"]
    retry_run = [r for r in child_runs(first.parent_run_id)
                 if r.data.tags["optuna.trial_number"] == str(retry.number)]
    assert [r.data.tags["optuna.retry_of"] for r in retry_run] == [str(dead.number)]
    assert mlflow.get_run(first.parent_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_workers_of_a_sigkilled_search_end_their_trials_and_exit(tmp_path, tracking_uri):
    """SIGKILL to the search process itself (not a worker): its --workers 2 processes get SIGTERM
    (PR_SET_PDEATHSIG), end their trials as interrupted and exit, instead of training on,
    orphaned, to the end of the budget."""
    config = write_search(tmp_path, ROTATION, enqueue_base=True)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracking.search", "--config", str(config), "--n-trials", "20",
         "--workers", "2", "--epochs", "30", "--train-limit", "1000", "--test-limit", "300",
         "--set", "data.val_size=500", "--storage", storage, "--study-name", "killed",
         "--experiment", "search-test"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = psutil.Process(wait_for_incumbent_epoch(proc, storage))
    assert worker.ppid() == proc.pid
    proc.kill()
    proc.wait()
    gone = time.monotonic() + 60
    while time.monotonic() < gone and worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.2)
    assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, "the worker trains on"

    trials = optuna.load_study(study_name="killed", storage=storage).trials
    assert trials[0].state == TrialState.FAIL and len(trials) <= 3  # no new trial after the kill
    (run,) = trial_runs(0)
    assert run.info.status == "KILLED" and run.data.tags["error"] == "interrupted"


def wait_for_incumbent_epoch(proc: subprocess.Popen, storage: str, timeout: float = 300) -> int:
    """The pid of the local worker training the incumbent (trial 0), once it logged an epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            trial = optuna.load_study(study_name="killed", storage=storage).trials[0]
        except (KeyError, IndexError):  # no study or trial yet
            trial = None
        if trial is not None and trial.state == TrialState.RUNNING and any(r.data.metrics for r in trial_runs(0)):
            return int(trial.user_attrs[N.WORKER_ATTR].rsplit(":", 1)[1])
        time.sleep(0.2)
    pytest.fail(f"trial 0 never trained within {timeout} s (rc {proc.poll()}): {proc.stderr.read()[-2000:]}")


def trial_runs(number: int) -> list:
    """The MLflow runs tagged with trial `number` (a retry has its own number)."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("search-test")
    return client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`{N.TRIAL_NUMBER_TAG}` = '{number}'")) if exp else []


@pytest.mark.slow
def test_a_killed_local_worker_is_recovered_and_its_incumbent_trial_run_again(tmp_path, tracking_uri):
    """SIGKILL to one of --workers 2 mid-trial: its trial (the enqueued stage-3 incumbent) is
    failed by heartbeat and queued again, a new process runs it as the rest of that worker's
    share, and the search ends normally, saying so in a line."""
    config = write_search(tmp_path, ROTATION, enqueue_base=True)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracking.search", "--config", str(config), "--n-trials", "2",
         "--workers", "2", "--heartbeat", "1", "--epochs", "2", "--train-limit", "1000",
         "--test-limit", "300", "--set", "data.val_size=500", "--storage", storage,
         "--study-name", "killed", "--experiment", "search-test"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.kill(wait_for_incumbent_epoch(proc, storage), signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert "was killed by SIGKILL; its trial 0 is failed and queued again" in err

    trials = optuna.load_study(study_name="killed", storage=storage).trials
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert trials[0].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs[N.INCUMBENT] is True
    assert retry.params == trials[0].params
    assert sum(t.state != TrialState.FAIL for t in trials) == 2  # the lost worker's share too
    (killed_run,) = trial_runs(0)
    assert killed_run.info.status == "FAILED" and "lost: no heartbeat" in killed_run.data.tags["error"]
