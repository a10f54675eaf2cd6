"""The search's parent run (tracking/search/parent.py): a shared search's workers join one parent
run and stop at the study's quota; under `mlflow run` the entry point's run is the parent.

SQLite storage stands in for PostgreSQL here (same RDB code path, heartbeats included); the
real multi-process, multi-worker test with SIGKILL is tests/tracking/test_team.py.
"""

from __future__ import annotations

import mlflow
import pytest
from optuna.trial import TrialState

from mnist_mlflow.config import ConfigError
from tests.tracking.search.helpers import ROTATION, child_runs, options, shared, write_search
from tracking.search import names as N
from tracking.search import parent
from tracking.search import study as search_study
from tracking.search.plan import resolve
from tracking.search.run import run_search


@pytest.mark.slow  # an end-to-end chain of several trainings: the whole suite runs it
def test_later_workers_join_the_parent_run_and_stop_at_the_study_quota(tmp_path, mnist, tracking_uri):
    config = write_search(tmp_path, ROTATION)
    first = run_search(shared(tmp_path, config, study_trials=2), mnist=mnist)
    second = run_search(shared(tmp_path, config, study_trials=3), mnist=mnist)  # one more
    again = run_search(shared(tmp_path, config, study_trials=3), mnist=mnist)  # nothing to do

    assert first.parent_run_id == second.parent_run_id == again.parent_run_id
    study = again.study
    assert study.user_attrs[N.PARENT_ATTR] == first.parent_run_id
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    children = child_runs(first.parent_run_id)
    assert [r.data.tags["optuna.trial_number"] for r in children] == ["0", "1", "2"]
    assert all(r.info.status == "FINISHED" and r.data.tags["optuna.worker"] for r in children)
    run = mlflow.get_run(first.parent_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["search_role"] == "parent"
    assert run.data.params["search.study_trials"] == "2"  # the creator's invocation
    assert run.data.metrics["n_complete"] == 3  # the summary covers the whole study


def test_a_study_started_without_study_trials_cannot_be_joined(tmp_path, mnist, tracking_uri,
                                                                monkeypatch):
    config = write_search(tmp_path, ROTATION)
    opts = shared(tmp_path, config, study_trials=1)
    search_study.open_study(resolve(opts).spec, search_study.open_storage(opts.storage), opts.study_name)
    monkeypatch.setattr(parent, "JOIN_WAIT_S", 0)
    with pytest.raises(ConfigError, match="has no shared parent run"):
        run_search(opts, mnist=mnist)


def test_under_mlflow_run_the_entry_points_run_is_the_parent(tmp_path, mnist, tracking_uri, monkeypatch):
    """`mlflow run -e search` hands its run over in MLFLOW_RUN_ID: the search adopts it, as
    mlflow.start_run would, and its trials nest under it."""
    experiment_id = mlflow.create_experiment("search-test")
    entry = mlflow.MlflowClient().create_run(experiment_id, run_name="mlflow-run", tags={"x": "y"})
    monkeypatch.setenv("MLFLOW_RUN_ID", entry.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    result = run_search(options(tmp_path, write_search(tmp_path, ROTATION), n_trials=1, experiment=""),
                        mnist=mnist)

    assert result.parent_run_id == entry.info.run_id
    run = mlflow.get_run(entry.info.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "search-test-study"
    assert run.data.tags["search_role"] == "parent" and run.data.tags["x"] == "y"
    assert run.data.params["search.n_trials"] == "1" and run.data.metrics["n_complete"] == 1
    (child,) = child_runs(entry.info.run_id)
    assert child.info.experiment_id == experiment_id and child.info.status == "FINISHED"


@pytest.mark.slow  # an end-to-end chain of several trainings: the whole suite runs it
def test_the_last_worker_out_summarizes_and_ends_the_parent(tmp_path, mnist, tracking_uri):
    """A worker leaving while another's trial trains neither summarizes (the best trial could
    still be overtaken, and MLflow params cannot change) nor ends the parent."""
    config = write_search(tmp_path, ROTATION)
    first = run_search(shared(tmp_path, config, study_trials=1), mnist=mnist)
    elsewhere = first.study.ask()  # another worker's trial, training

    # waits for that trial (it has no heartbeat, so it never goes stale), then gives up
    idle = run_search(shared(tmp_path, config, study_trials=2, timeout=2), mnist=mnist)
    run = mlflow.get_run(first.parent_run_id)
    assert idle.parent_run_id == first.parent_run_id
    assert run.info.status == "RUNNING" and run.data.metrics["n_complete"] == 1
    assert run.data.metrics.get("n_unfinished", 0) == 0  # the first worker's summary, untouched

    elsewhere.set_user_attr(N.NUM_PARAMS, 7000)
    first.study.tell(elsewhere, 99.0)  # that worker finishes... and dies before its summary
    last = run_search(shared(tmp_path, config, study_trials=2), mnist=mnist)
    run = mlflow.get_run(last.parent_run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["n_complete"] == 2
