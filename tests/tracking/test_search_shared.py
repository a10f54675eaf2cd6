"""A shared search (--study-trials) on one machine: one parent run, the study's quota, dead workers.

SQLite storage stands in for PostgreSQL here (same RDB code path, heartbeats included); the
real multi-process, multi-worker test with SIGKILL is tests/tracking/test_team.py.
"""

from __future__ import annotations

import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from mnist_mlflow.config import ConfigError
from tests.tracking.test_search import ROTATION, child_runs, options, write_search
from tracking import search, search_shared, search_study
from tracking.search_objective import TrialRuns


def shared(tmp_path, config, **changes) -> search.Options:
    return options(tmp_path, config, n_trials=None, storage=f"sqlite:///{tmp_path}/optuna.db",
                   **changes)


def test_bad_shared_options_are_refused_before_anything_exists(tmp_path, capsys):
    assert search.main(["--study-trials", "3", "--n-trials", "2",
                        "--storage", f"sqlite:///{tmp_path}/o.db"]) == 2
    assert "not both" in capsys.readouterr().err
    assert search.main(["--study-trials", "3", "--storage", f"journal:{tmp_path}/o.log"]) == 2
    assert "needs a database storage with heartbeats" in capsys.readouterr().err
    assert search.main(["--study-trials", "0"]) == 2
    assert "--study-trials='0' is not allowed" in capsys.readouterr().err
    assert search.main(["--heartbeat", "0"]) == 2
    assert not list(tmp_path.iterdir())


def test_later_workers_join_the_parent_run_and_stop_at_the_study_quota(tmp_path, mnist, tracking_uri):
    config = write_search(tmp_path, ROTATION)
    first = search.run_search(shared(tmp_path, config, study_trials=2), mnist=mnist)
    second = search.run_search(shared(tmp_path, config, study_trials=3), mnist=mnist)  # one more
    again = search.run_search(shared(tmp_path, config, study_trials=3), mnist=mnist)  # nothing to do

    assert first.parent_run_id == second.parent_run_id == again.parent_run_id
    study = again.study
    assert study.user_attrs[search_shared.PARENT_ATTR] == first.parent_run_id
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    children = child_runs(first.parent_run_id)
    assert [r.data.tags["optuna.trial_number"] for r in children] == ["0", "1", "2"]
    assert all(r.info.status == "FINISHED" and r.data.tags["optuna.worker"] for r in children)
    parent = mlflow.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["search_role"] == "parent"
    assert parent.data.params["search.study_trials"] == "2"  # the creator's invocation
    assert parent.data.metrics["n_complete"] == 3  # the summary covers the whole study


def test_a_dead_workers_trial_is_failed_retried_and_its_run_closed(tmp_path, mnist, tracking_uri):
    """A trial left RUNNING by a worker that vanished (its heartbeat stopped): the next worker
    fails it after 3 heartbeats, runs it again with its params, and ends its MLflow run FAILED."""
    config = write_search(tmp_path, ROTATION)
    opts = shared(tmp_path, config, study_trials=2, heartbeat=1)
    first = search.run_search(shared(tmp_path, config, study_trials=1, heartbeat=1), mnist=mnist)

    # The vanished worker: its trial started, its run exists, then silence.
    storage = search_study.open_storage(opts.storage, heartbeat_s=1)
    study = optuna.load_study(study_name=opts.study_name, storage=storage)
    dead = study.ask({"augment.rotation_degrees": optuna.distributions.FloatDistribution(0, 15)})
    runs = TrialRuns(first.parent_run_id, mlflow.get_experiment_by_name("search-test").experiment_id,
                     opts.study_name, "search", "gone-host:1")
    for key, value in {search_shared.PARENT_ATTR: runs.parent_run_id,
                       search_shared.EXPERIMENT_ATTR: runs.experiment_id,
                       "worker": runs.worker}.items():
        dead.set_user_attr(key, value)
    dead_run = mlflow.MlflowClient().create_run(runs.experiment_id, tags=runs.tags(dead.number, "RUNNING"))
    storage.record_heartbeat(dead._trial_id)
    time.sleep(3.5)  # 3 heartbeats of 1 s

    result = search.run_search(opts, mnist=mnist)

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


def test_a_study_started_without_study_trials_cannot_be_joined(tmp_path, mnist, tracking_uri,
                                                                monkeypatch):
    config = write_search(tmp_path, ROTATION)
    opts = shared(tmp_path, config, study_trials=1)
    spec, _ = search.resolve(opts)
    search_study.open_study(spec, search_study.open_storage(opts.storage), opts.study_name)
    monkeypatch.setattr(search_shared, "JOIN_WAIT_S", 0)
    with pytest.raises(ConfigError, match="has no shared parent run"):
        search.run_search(opts, mnist=mnist)
