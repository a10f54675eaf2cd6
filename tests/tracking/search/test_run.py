"""One invocation (tracking/search/run.py): resuming an interrupted search, local workers."""

from __future__ import annotations

import mlflow
import pytest
from optuna.trial import TrialState

from tests.tracking.search.helpers import ROTATION, child_runs, fit_that, options, write_search
from tracking.lifecycle import runs
from tracking.search import report
from tracking.search.run import run_search


@pytest.mark.slow  # an end-to-end chain of several trainings: the whole suite runs it
def test_an_interrupted_search_resumes_without_repeating_trials(tmp_path, mnist, tracking_uri,
                                                                monkeypatch):
    config = write_search(tmp_path, {**ROTATION, "optim.lr": {"type": "float", "low": 0.001,
                                                              "high": 0.1, "log": True}})
    opts = options(tmp_path, config, storage=f"sqlite:///{tmp_path}/optuna.db")  # RDB + heartbeat
    real_fit = runs.fit
    fit_that(monkeypatch, raise_on_call=2, error=KeyboardInterrupt())  # Ctrl-C in trial 1
    with pytest.raises(KeyboardInterrupt):
        run_search(opts, mnist=mnist)
    first_parent = mlflow.search_runs(experiment_names=["search-test"], output_format="list",
                                      filter_string="tags.search_role = 'parent'")[0]
    assert first_parent.info.status == "KILLED"
    interrupted = child_runs(first_parent.info.run_id)[1]
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["trial_state"] == "FAIL"

    monkeypatch.setattr(runs, "fit", real_fit)
    result = run_search(opts, mnist=mnist)  # the same command again

    trials = result.study.trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL,
                                         TrialState.COMPLETE, TrialState.COMPLETE]
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    assert trials[3].params not in [t.params for t in trials[:3]]  # new, not a replay
    all_children = child_runs(first_parent.info.run_id) + child_runs(result.parent_run_id)
    numbers = [r.data.tags["optuna.trial_number"] for r in all_children]
    assert sorted(numbers) == ["0", "1", "2", "3"]  # trial 0 was not trained again
    assert mlflow.get_run(result.parent_run_id).data.params["search.requeued_trials"] == "[1]"


@pytest.mark.slow
def test_two_worker_processes_share_one_study(tmp_path, mnist, tracking_uri):
    config = write_search(tmp_path, ROTATION)
    result = run_search(options(tmp_path, config, n_trials=4, workers=2), mnist=mnist)

    trials = result.study.trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.params["augment.rotation_degrees"] for t in trials}) == 4
    children = child_runs(result.parent_run_id)
    assert [r.data.tags["optuna.trial_number"] for r in children] == ["0", "1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert mlflow.get_run(result.parent_run_id).info.status == "FINISHED"
    assert report.counts(result.study)["COMPLETE"] == 4
