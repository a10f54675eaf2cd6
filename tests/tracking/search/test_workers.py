"""A shared search's workers (tracking/search/workers.py, study.RetryAndCloseRun): a dead
worker's trial is failed, retried with its params, and its run closed."""

from __future__ import annotations

import time

import mlflow
import optuna
from optuna.trial import TrialState

from tests.tracking.search.helpers import ROTATION, child_runs, shared, write_search
from tracking.search import names as N
from tracking.search import study as search_study
from tracking.search.run import run_search
from tracking.search.trial_runs import TrialRuns


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
