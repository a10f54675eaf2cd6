"""One trial (tracking/search/objective.py): the budget, pruning, failures, the objective's
data, and the MLflow runs each state leaves."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from mnist_mlflow import config as C
from tests.conftest import ROOT
from tests.tracking.search.helpers import ROTATION, SEARCH_YAML, child_runs, fit_that, options, write_search
from tracking.search import study as search_study
from tracking.search.plan import resolve
from tracking.search.run import run_search
from tracking.search.space import load_search


def test_over_budget_trials_are_rejected_untrained(tmp_path, mnist, tracking_uri, monkeypatch):
    one = lambda v: {"type": "categorical", "choices": [v]}  # noqa: E731
    # widths 12, 16, 12, 16, 16, 16 and no fourth 3x3 convolution: 8,710 parameters
    config = write_search(tmp_path, {"model.width1": one(12), "model.width2": one(16), "model.width_transition": one(12),
                                     **{f"model.width{i}": one(16) for i in (3, 4, 5)}, "model.width6": one(None),
                                     **ROTATION})
    fit_that(monkeypatch, raise_on_call=1, error=AssertionError("an over-budget model trained"))
    result = run_search(options(tmp_path, config), mnist=mnist)

    # rejections use up no trial; a space with nothing under the budget still ends
    assert result.counts == {"COMPLETE": 0, "PRUNED": 0, "STOPPED": 0, "REJECTED": 10, "FAIL": 0,
                             "SURPLUS": 0, "RUNNING": 0}
    assert result.best is None
    with pytest.raises(ValueError):
        result.study.best_trial  # noqa: B018 - Optuna has no best: nothing feasible completed
    for t in result.study.trials:
        assert t.state == TrialState.PRUNED and "8,710 parameters" in t.user_attrs["rejected"]
        assert t.constraints == {"params_over_budget": 710.0}
    children = child_runs(result.parent_run_id)
    assert [r.data.tags["trial_state"] for r in children] == ["REJECTED"] * 10
    for r in children:
        assert r.info.status == "KILLED" and r.data.metrics == {}
        assert r.data.params["num_params"] == "8710" and "over the budget" in r.data.tags["rejected_reason"]
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_rejected"] == 10
    assert not any(k.startswith("best.") for k in parent.data.params)


def test_over_budget_trials_do_not_use_up_the_trials_asked_for(tmp_path, mnist, tracking_uri):
    # width1 12 with these widths: 8,710 parameters (rejected); 8: 7,442 (trains)
    config = write_search(tmp_path, {"model.width1": {"type": "categorical", "choices": [12, 8]},
                                     "model.width2": {"type": "categorical", "choices": [16]},
                                     **{f"model.width{i}": {"type": "categorical", "choices": [16]} for i in (3, 4, 5)},
                                     "model.width6": {"type": "categorical", "choices": [None]}})
    result = run_search(options(tmp_path, config, n_trials=3, epochs=1), mnist=mnist)
    c = result.counts
    assert c["COMPLETE"] + c["PRUNED"] + c["STOPPED"] == 3 and c["REJECTED"] >= 1
    assert c["REJECTED"] == sum(t.params["model.width1"] == 12 for t in result.study.trials)


def test_a_pruned_trial_is_pruned_in_optuna_and_killed_in_mlflow(tmp_path, mnist, tracking_uri):
    # No accuracy reaches 101%: the threshold pruner stops the trial after its first epoch.
    config = write_search(tmp_path, ROTATION, pruner={"name": "threshold", "lower": 101.0})
    result = run_search(options(tmp_path, config, n_trials=1, epochs=2), mnist=mnist)

    (trial,) = result.study.trials
    assert trial.state == TrialState.PRUNED and "rejected" not in trial.user_attrs
    assert list(trial.intermediate_values) == [1]
    (run,) = child_runs(result.parent_run_id)
    assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "PRUNED"
    assert "error" not in run.data.tags  # ended once, KILLED on purpose, never FAILED
    assert "epoch 1" in run.data.tags["pruned_reason"] and "objective" not in run.data.metrics
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1]
    assert mlflow.get_run(result.parent_run_id).data.metrics["n_pruned"] == 1


def test_the_objective_never_reads_the_test_set(tmp_path, mnist, tracking_uri):
    """The same seeded trial, once with the real test set and once with noise images and
    shuffled labels: equal objectives, while the logged test accuracy differs."""
    rng = np.random.default_rng(0)
    scrambled = dataclasses.replace(
        mnist, test_x=rng.integers(0, 256, mnist.test_x.shape, dtype=np.uint8),
        test_y=rng.permutation(mnist.test_y))
    config = write_search(tmp_path, ROTATION)
    results = [run_search(options(tmp_path, config, n_trials=1, epochs=2,
                                         storage=f"journal:{tmp_path}/{name}.log"), mnist=data)
               for name, data in (("real", mnist), ("scrambled", scrambled))]

    real, fake = (r.study.trials[0] for r in results)
    assert real.params == fake.params
    assert real.state == fake.state == TrialState.COMPLETE
    assert real.value == fake.value and real.intermediate_values == fake.intermediate_values
    test_acc = [child_runs(r.parent_run_id)[0].data.metrics["test_accuracy"] for r in results]
    assert test_acc[0] != test_acc[1]  # the test set was really swapped, and only reported


def test_failures_do_not_stop_the_study_and_runs_nest_under_the_parent(tmp_path, mnist,
                                                                       tracking_uri, monkeypatch):
    config = write_search(tmp_path, {"model.width1": {"type": "categorical", "choices": [9, 12]},
                                     **ROTATION})
    opts = options(tmp_path, config, n_trials=2)  # the rejected trial uses up none
    spec = load_search(config, {"data.val_size": 500, "data.train_limit": 256, "optim.epochs": 1})
    study, _ = search_study.open_study(spec, search_study.open_storage(opts.storage), opts.study_name)
    for width1 in (9, 12, 9):  # fail, rejected, complete: in this order
        study.enqueue_trial({"model.width1": width1})
    fit_that(monkeypatch, raise_on_call=1, error=RuntimeError("boom"))
    result = run_search(opts, mnist=mnist)

    states = [t.state for t in result.study.trials]
    assert states == [TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE]
    children = child_runs(result.parent_run_id)
    assert [(r.info.status, r.data.tags["trial_state"]) for r in children] == [
        ("FAILED", "FAIL"), ("KILLED", "REJECTED"), ("FINISHED", "COMPLETE")]
    assert "RuntimeError('boom')" in children[0].data.tags["error"]
    assert children[2].data.metrics["objective"] == result.study.trials[2].value

    parent = mlflow.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["search_role"] == "parent"
    assert parent.data.params["best.model.width1"] == "9" and parent.data.params["best.trial_number"] == "2"
    assert parent.data.tags["best_trial_run_id"] == children[2].info.run_id
    assert {"n_complete": 1, "n_failed": 1, "n_rejected": 1}.items() <= parent.data.metrics.items()
    figures = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/optimization_history.png", "figures/intermediate_values.png"} <= figures

    # best_config.yaml is stage 3's file with the trial's recipe: copied next to stage3.yaml
    # (into experiments/), tracking.stage runs it as it is
    best_yaml = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id,
                                                    artifact_path="best_config.yaml", dst_path=str(tmp_path))
    assert yaml.safe_load(Path(best_yaml).read_text())["extends"] == "stage3.yaml"
    (tmp_path / "stage3.yaml").write_text((ROOT / "experiments/stage3.yaml").read_text())
    best = C.flatten(C.load(best_yaml))
    trial = result.study.trials[2].user_attrs["config"]
    recipe = [k for k in trial if not k.startswith(C.NOT_RECIPE)]  # the rest is stage 3's
    assert {k: best[k] for k in recipe} == {k: trial[k] for k in recipe}
    assert best["data.val_size"] == 0 and best["stage"] == "search-best"  # trains on all 60,000
    from tracking import stage
    assert stage.main([best_yaml, "--no-progress", "--experiment", "best-rerun", "--train-limit", "256",
                       "--test-limit", "300"]) == 0


def test_the_pruner_compares_hold_scores_in_the_studys_direction():
    """Reported scores are lower-is-better like the objective: with Optuna's median pruner a
    clearly worse trial is pruned and a clearly better one is not."""
    from mnist_mlflow.train import EpochMetrics
    from tracking.search.objective import HoldReporter

    spec = load_search(SEARCH_YAML)
    study = optuna.create_study(direction="minimize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2))

    def run(val: list[float]) -> str:
        trial = study.ask()
        reporter = HoldReporter(trial, spec, 15)
        try:
            for epoch, acc in enumerate(val, 1):
                m = EpochMetrics(epoch, 0.1, 99.0, 0.1, 99.0, 0.01, 1.0, val_loss=0.1, val_accuracy=acc)
                if reporter(m):
                    break
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            return "pruned"
        reporter.report_rest(15)
        study.tell(trial, reporter.value)
        return "complete"

    typical = [97.0, 98.0, 98.6, 98.9, 99.0, 99.1, 99.2, 99.3, 99.32, 99.33, 99.35]
    for _ in range(3):
        assert run(typical) == "complete"
    assert run([90.0, 94.0, 95.0, 95.5, 96.0, 96.0, 96.0, 96.0]) == "pruned"
    better = [97.5, 98.5, 99.0, 99.31, 99.35, 99.36, 99.4]
    assert run(better) == "complete"
    assert study.best_trial.number == 4 and study.best_value < 7  # held at epoch 7, stopped there


def test_a_trial_stops_once_it_cannot_come_within_the_race_margin_of_the_best():
    """Best 8.0, margin 1.0: the bar is 9.0. With no epoch above the threshold yet, the earliest
    hold completes 4 epochs on, so after epoch 5 the best possible score is 9 - 0.99 (goes on)
    and after epoch 6 it is 10 - 0.99 > 9 (stopped, STOPPED rather than PRUNED)."""
    from mnist_mlflow.train import EpochMetrics
    from tracking.search.objective import HoldReporter, Pruned, race_bar

    spec = load_search(SEARCH_YAML)
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.NopPruner())
    study.add_trial(optuna.trial.create_trial(value=8.0))
    trial = study.ask()
    reporter = HoldReporter(trial, spec, 15, bar=lambda: race_bar(study, 1.0))
    metrics = lambda epoch: EpochMetrics(epoch, 0.1, 99.0, 0.1, 99.0, 0.01, 1.0,  # noqa: E731
                                         val_loss=0.1, val_accuracy=99.0)
    for epoch in range(1, 6):
        assert reporter(metrics(epoch)) is False
    assert reporter.lowest_possible() == pytest.approx(9 - 0.99)
    with pytest.raises(Pruned, match="stopped at epoch 6"):
        reporter(metrics(6))
    assert "stopped at epoch 6" in study.trials[-1].user_attrs["stopped_early"]
    assert race_bar(optuna.create_study(), 1.0) is None  # no best yet: nothing stops


def test_a_promising_trial_is_raced_over_more_seeds_and_scored_by_their_mean(tmp_path, mnist, tracking_uri):
    config = write_search(tmp_path, ROTATION, race={"seeds": 2, "margin": 100.0})
    # a threshold every model holds at once: only a trial whose first seed held is raced
    easy = ("data.val_size=500", "device=cpu", "target.accuracy=1", "target.hold=1")
    result = run_search(options(tmp_path, config, n_trials=1, overrides=easy), mnist=mnist)

    (trial,) = result.study.trials
    scores = trial.user_attrs["seed_scores"]
    assert set(scores) == {"1", "2"} and trial.value == pytest.approx(sum(scores.values()) / 2)
    assert trial.user_attrs["epochs_trained"] == 2  # one epoch a seed
    (run,) = child_runs(result.parent_run_id)
    assert run.data.metrics["seeds"] == 2 and run.data.metrics["objective"] == pytest.approx(trial.value)
    client = mlflow.MlflowClient()
    (seed_run,) = client.search_runs([run.info.experiment_id],
                                     f"tags.`optuna.race_trial` = '{trial.number}'")
    assert seed_run.data.tags["mlflow.parentRunId"] == run.info.run_id
    assert seed_run.data.params["seed"] == "2" and seed_run.info.status == "FINISHED"
    assert seed_run.data.metrics["objective"] == pytest.approx(scores["2"])


def test_a_trial_that_never_held_is_not_raced(tmp_path, mnist, tracking_uri):
    config = write_search(tmp_path, ROTATION, race={"seeds": 3, "margin": 100.0})
    result = run_search(options(tmp_path, config, n_trials=1), mnist=mnist)  # 1 epoch: no hold
    (trial,) = result.study.trials
    assert trial.user_attrs["val_hold_epoch"] is None and list(trial.user_attrs["seed_scores"]) == ["1"]
    assert trial.user_attrs["epochs_trained"] == 1


def test_the_hard_budget_stops_a_trial_that_has_not_held_and_cuts_a_race():
    """Out of time: a first seed that has not held is STOPPED at that epoch; a further seed
    raises RaceCut (its run ends KILLED); a seed that held is left alone."""
    from mnist_mlflow.train import EpochMetrics
    from tracking.search.objective import HoldReporter, Pruned, RaceCut

    spec = load_search(SEARCH_YAML)
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.NopPruner())
    metrics = lambda epoch, acc: EpochMetrics(epoch, 0.1, 99.0, 0.1, 99.0, 0.01, 1.0,  # noqa: E731
                                              val_loss=0.1, val_accuracy=acc)
    late = [False]
    first = HoldReporter(study.ask(), spec, 15, out_of_time=lambda: late[0])
    assert first(metrics(1, 98.0)) is False
    late[0] = True
    with pytest.raises(Pruned, match="stopped at epoch 2: the search's time budget ended"):
        first(metrics(2, 98.0))
    assert "time budget" in study.trials[-1].user_attrs["stopped_early"]
    further = HoldReporter(study.ask(), spec, 15, primary=False, out_of_time=lambda: True)
    with pytest.raises(RaceCut, match="ended at epoch 1"):
        further(metrics(1, 98.0))
    clock = [False]
    held = HoldReporter(study.ask(), spec, 15, primary=False, out_of_time=lambda: clock[0])
    for epoch in range(1, 4):
        assert held(metrics(epoch, 99.9)) is False
    clock[0] = True
    assert held(metrics(4, 99.9)) is True  # held: done, whatever the clock says


def test_a_hard_budget_search_ends_its_running_trial_at_the_budget(tmp_path, mnist, tracking_uri):
    config = write_search(tmp_path, ROTATION, race={"seeds": 3, "margin": 100.0})
    # 300 epochs would take minutes; 256 training images never hold 99.8 %
    opts = options(tmp_path, config, n_trials=2, epochs=300, timeout=4,  # hard: search.yaml's default
                   overrides=("data.val_size=500", "device=cpu", "target.accuracy=100"))
    assert resolve(opts).hard_budget and not resolve(dataclasses.replace(opts, hard_budget=False)).hard_budget
    start = time.monotonic()
    result = run_search(opts, mnist=mnist)
    assert time.monotonic() - start < 60
    (trial,) = result.study.trials  # the budget ended before a second could start
    assert trial.state == TrialState.PRUNED and "time budget" in trial.user_attrs["stopped_early"]
    assert 1 <= trial.user_attrs["epochs_trained"] < 300
    (run,) = child_runs(result.parent_run_id)
    assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "STOPPED"
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.data.params["search.hard_budget"] == "True" and parent.data.metrics["n_stopped_early"] == 1


def test_a_race_the_hard_budget_reaches_scores_the_seeds_it_finished(tmp_path, mnist, tracking_uri):
    """The deadline has passed when the first seed holds (at epoch 1, on an easy threshold):
    the trial is COMPLETE on that seed, its further seeds never start."""
    from tracking.search.objective import Objective, TrialContext

    config = write_search(tmp_path, ROTATION, race={"seeds": 3, "margin": 100.0})
    spec = load_search(config, {"data.val_size": 500, "device": "cpu", "data.train_limit": 256,
                                "data.test_limit": 300, "optim.epochs": 2, "target.accuracy": 1,
                                "target.hold": 1})
    study = optuna.create_study(direction="minimize")
    experiment_id = mlflow.set_experiment("race-cut").experiment_id  # a worker's, as in worker_main
    with mlflow.start_run() as parent:
        ctx = TrialContext(spec, "race-cut", parent.info.run_id, experiment_id, mnist,
                           deadline=time.time() - 1)
        study.optimize(Objective(ctx), n_trials=1)
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE and list(trial.user_attrs["seed_scores"]) == ["1"]
    assert "seed 2 never started" in trial.user_attrs["race_cut"]
    (run,) = child_runs(parent.info.run_id)
    assert run.data.tags["race_cut"] == trial.user_attrs["race_cut"] and run.data.metrics["seeds"] == 1
