"""The Optuna search: its file, the budget, pruning, failures, resuming, workers, MLflow nesting.

Trials train on slivers of real MNIST (256 training, 500 validation, 300 test images, 1-2
epochs), so each takes seconds; only the multi-process test is marked slow.
"""

from __future__ import annotations

import dataclasses
import shlex
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from mnist_mlflow import config as C
from mnist_mlflow.config import ConfigError
from mnist_mlflow.models import param_count_of
from tracking import runs, search, search_report, search_study
from tracking.search_space import load_search, make_sampler, sample_params

ROOT = Path(__file__).resolve().parents[2]
SEARCH_YAML = ROOT / "experiments/search.yaml"
ROTATION = {"augment.rotation_degrees": {"type": "float", "low": 0.0, "high": 15.0}}


def write_search(tmp_path: Path, space: dict, **settings) -> Path:
    """experiments/search.yaml with another space and search settings (by default no fixed
    paths and no incumbent trial, so that trial numbers are the sampler's)."""
    raw = yaml.safe_load(SEARCH_YAML.read_text())
    raw["extends"] = str(SEARCH_YAML.parent / raw["extends"])
    raw["space"] = space
    raw["search"].update({"fixed": [], "enqueue_base": False, **settings})
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def options(tmp_path: Path, config: Path, **changes) -> search.Options:
    base = dict(config=str(config), n_trials=2, epochs=1, storage=f"journal:{tmp_path}/optuna.log",
                study_name="test-study", seed=0, train_limit=256, test_limit=300,
                experiment="search-test", overrides=("data.val_size=500", "device=cpu"))
    return search.Options(**{**base, **changes})


def child_runs(parent_id: str) -> list:
    """The parent's child runs, in trial order."""
    client = mlflow.MlflowClient()
    exp = client.get_run(parent_id).info.experiment_id
    found = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return sorted(found, key=lambda r: int(r.data.tags["optuna.trial_number"]))


def fit_that(monkeypatch, *, raise_on_call: int, error: BaseException):
    """Makes the `raise_on_call`-th training (from 1) raise `error` inside its MLflow run."""
    real_fit, calls = runs.fit, []

    def fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == raise_on_call:
            raise error
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(runs, "fit", fit)
    return calls


# ---------------------------------------------------------------- the search file

@pytest.mark.parametrize("space, message", [
    ({"optim.lrr": {"type": "float", "low": 0.001, "high": 0.1}},
     "unknown config path 'optim.lrr' .*did you mean 'optim.lr'"),
    ({"model.max_params": {"type": "int", "low": 7000, "high": 9000}}, "cannot be searched"),
    ({"data.val_size": {"type": "int", "low": 1, "high": 9}}, "same validation split"),
    ({"augment.rotation_degrees": {"type": "float", "low": 0, "high": 200}}, "config refuses"),
    ({"optim.lr": {"type": "float", "low": "1e-3", "high": 0.1}}, "write 1.0e-3"),
    ({"optim.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "space.optim.lr"),
    ({"optim.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "float | int | categorical"),
    ({"optim.lr": {"type": "float", "low": 0.1, "high": 0.2, "choices": [1]}}, "unknown key 'choices'"),
    ({"schedule.max_lr": {"type": "float", "low": 0.01, "high": 0.1, "when": {"schedule.name": "onecycle"}},
      "schedule.name": {"type": "categorical", "choices": ["onecycle", "step"]}}, "sampled at or after"),
    ({"schedule.name": {"type": "categorical", "choices": ["onecycle", "step"]},
      "schedule.gamma": {"type": "float", "low": 0.1, "high": 0.5, "when": {"schedule.name": "stepp"}}},
     "never sampled"),
])
def test_bad_space_is_refused_with_the_reason(tmp_path, space, message):
    with pytest.raises(ConfigError, match=message):
        load_search(write_search(tmp_path, space))


@pytest.mark.parametrize("settings, message", [
    ({"pruner": {"name": "medain"}}, "search.pruner"),
    ({"pruner": {"name": "median", "n_warmup": 3}}, "median"),
    ({"objective_last_epoch": 4}, "unknown key 'search.objective_last_epoch'"),
])
def test_bad_search_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        load_search(write_search(tmp_path, ROTATION, **settings))


def test_cli_refuses_a_bad_file_before_anything_exists(tmp_path, capsys):
    bad = write_search(tmp_path, {"optim.lrr": {"type": "float", "low": 0.001, "high": 0.1}})
    assert search.main(["--config", str(bad), "--storage", f"journal:{tmp_path}/x.log"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert not (tmp_path / "x.log").exists()
    assert search.main(["--epochs", "two"]) == 2
    assert "--epochs='two' is not an integer" in capsys.readouterr().err


@pytest.mark.parametrize("path", ["/sys/optuna.log", "/proc/version"])  # unwritable even for root
def test_an_unwritable_journal_is_one_line_and_exit_2(tracking_uri, path, capsys):
    assert search.main(["--config", str(ROOT / "experiments/search.yaml"), "--storage", f"journal:{path}",
                        "--n-trials", "1", "--epochs", "1", "--train-limit", "500", "--test-limit", "100"]) == 2
    err = capsys.readouterr().err
    assert f"storage 'journal:{path}' cannot be written" in err and len(err.strip().splitlines()) == 1


def test_empty_cli_values_mean_unset():
    opts = search.parse_args(["--n-trials", "", "--epochs", "", "--storage", "", "--workers", "",
                              "--seed", "", "--timeout", "", "--train-limit", "", "--test-limit", ""])
    assert opts == search.Options()


def test_mlproject_search_entry_passes_every_parameter():
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["search"]
    params = entry["parameters"]
    assert set(params) == {"n_trials", "epochs", "storage", "study_name", "timeout", "workers",
                           "seed", "train_limit", "test_limit", "max_params", "set"}
    argv = shlex.split(entry["command"].format(**{k: shlex.quote(v["default"])
                                                  for k, v in params.items()}))
    assert argv[:3] == ["python", "-m", "tracking.search"]
    assert search.parse_args(argv[3:]) == search.Options()  # '' everywhere: the file decides


def test_the_search_file_is_stage_3_apart_from_the_keys_it_declares():
    """Derived, never copied: a stage-3 recipe change reaches the search's base config."""
    spec = load_search(SEARCH_YAML)
    declared = C.flatten(C.from_dict({k: v for k, v in yaml.safe_load(SEARCH_YAML.read_text()).items()
                                      if k not in ("extends", "search", "space")}))
    declared = {k for k, v in declared.items() if v != C.flatten(C.RunConfig())[k]}
    stage3, base = C.flatten(C.load(ROOT / "experiments/stage3.yaml")), C.flatten(spec.base)
    drift = {k: (stage3[k], base[k]) for k in stage3 if stage3[k] != base[k] and k not in declared}
    assert drift == {}
    assert declared == {"stage", "data.val_size"}
    assert spec.extends == str(ROOT / "experiments/stage3.yaml")


def test_the_search_file_keeps_the_assignments_fixed_points_and_searches_the_rest():
    spec = load_search(SEARCH_YAML)
    space = {p.path: p for p in spec.space}
    assert spec.budget == 8000 and spec.base.model.max_params == 8000
    assert spec.base.model.dropout == 0.05 and spec.base.augment.rotation_degrees == 6.9
    assert not {"model.dropout", "augment.rotation_degrees", "model.max_params"} & set(space)
    assert {"optim.epochs", "optim.name", "optim.batch_size", "optim.ema_decay", "schedule.max_lr",
            "schedule.pct_start", "schedule.anneal", "augment.thickness_prob", "model.width1",
            "model.width2", "model.width_transition", "model.width3", "model.width4",
            "model.width5"} <= set(space)
    assert spec.horizon == 15 and spec.threshold == pytest.approx(99.3)
    with pytest.raises(ConfigError, match="fixes it"):  # the file refuses to search them
        load_search(write_search(Path(tempfile.mkdtemp()), ROTATION,
                                 fixed=["augment.rotation_degrees"]))


def test_the_budget_is_a_search_setting_and_binds(tmp_path):
    spec = load_search(SEARCH_YAML, max_params=5000)
    assert spec.budget == spec.base.model.max_params == 5000
    small = C.ModelConfig(width1=6, width2=10, width_transition=6, width3=10, width4=10,
                          width5=10, max_params=None)
    assert param_count_of(small) <= 5000 < param_count_of(C.ModelConfig(max_params=None))


def test_the_base_config_is_the_first_trial(tmp_path):
    spec = load_search(SEARCH_YAML)
    storage = search_study.open_storage(f"journal:{tmp_path}/optuna.log")
    study = search_study.open_study(spec, storage, "s")
    trial = study.ask()
    cfg = C.replace(spec.base, sample_params(trial, spec.space, spec.base))
    assert trial.user_attrs["incumbent"] is True
    assert param_count_of(cfg.model) == param_count_of(spec.base.model) == 7759
    flat, base = C.flatten(cfg), C.flatten(spec.base)
    assert {k for k in flat if flat[k] != base[k]} <= {
        "optim.weight_decay", "model.width_transition", "model.width3", "model.width4", "model.width5"}
    assert cfg.optim.weight_decay <= 1e-6  # 0 clipped into the log range


def test_the_seed_fixes_the_sampled_params():
    spec = load_search(SEARCH_YAML)

    def sampled(seed: int) -> list[dict]:
        study = optuna.create_study(direction="minimize", sampler=make_sampler(spec.settings, seed))
        # 10 trials: past the 8 random startup trials, into TPE proper
        study.optimize(lambda t: sample_params(t, spec.space, spec.base)["schedule.max_lr"],
                       n_trials=10)
        return [t.params for t in study.trials]

    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)
    seeds = {search_study.sampler_seed(3, n_existing, worker) for n_existing in (0, 2) for worker in (0, 1)}
    assert len(seeds) == 4  # workers and resumed runs never replay each other's samples


def test_a_study_resumes_only_under_the_same_fixed_settings(tmp_path):
    storage = search_study.open_storage(f"journal:{tmp_path}/optuna.log")
    config = write_search(tmp_path, ROTATION)
    search_study.open_study(load_search(config, {"optim.epochs": 3}), storage, "s")
    search_study.open_study(load_search(config, {"optim.epochs": 3}), storage, "s")  # resumes
    with pytest.raises(ConfigError, match=r"horizon=3 \(now 5\)"):
        search_study.open_study(load_search(config, {"optim.epochs": 5}), storage, "s")


# ---------------------------------------------------------------- trials

def test_over_budget_trials_are_rejected_untrained(tmp_path, mnist, tracking_uri, monkeypatch):
    config = write_search(tmp_path, {"model.width1": {"type": "categorical", "choices": [12]},
                                     "model.width2": {"type": "categorical", "choices": [16]},
                                     **ROTATION})
    fit_that(monkeypatch, raise_on_call=1, error=AssertionError("an over-budget model trained"))
    result = search.run_search(options(tmp_path, config), mnist=mnist)

    assert result.counts == {"complete": 0, "pruned": 0, "rejected": 2, "failed": 0, "surplus": 0,
                             "unfinished": 0}
    assert result.best is None
    with pytest.raises(ValueError):
        result.study.best_trial  # noqa: B018 - Optuna has no best: nothing feasible completed
    for t in result.study.trials:
        assert t.state == TrialState.PRUNED and "8,710 parameters" in t.user_attrs["rejected"]
        assert t.constraints == {"params_over_budget": 710.0}
    children = child_runs(result.parent_run_id)
    assert [r.data.tags["trial_state"] for r in children] == ["REJECTED", "REJECTED"]
    for r in children:
        assert r.info.status == "KILLED" and r.data.metrics == {}
        assert r.data.params["num_params"] == "8710" and "over the budget" in r.data.tags["rejected_reason"]
    parent = mlflow.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_rejected"] == 2
    assert not any(k.startswith("best.") for k in parent.data.params)


def test_a_pruned_trial_is_pruned_in_optuna_and_killed_in_mlflow(tmp_path, mnist, tracking_uri):
    # No accuracy reaches 101%: the threshold pruner stops the trial after its first epoch.
    config = write_search(tmp_path, ROTATION, pruner={"name": "threshold", "lower": 101.0})
    result = search.run_search(options(tmp_path, config, n_trials=1, epochs=2), mnist=mnist)

    (trial,) = result.study.trials
    assert trial.state == TrialState.PRUNED and "rejected" not in trial.user_attrs
    assert list(trial.intermediate_values) == [1]
    (run,) = child_runs(result.parent_run_id)
    assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "PRUNED"
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
    results = [search.run_search(options(tmp_path, config, n_trials=1, epochs=2,
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
    opts = options(tmp_path, config, n_trials=3)
    study = search_study.open_study(load_search(config, {"data.val_size": 500, "data.train_limit": 256,
                                                   "optim.epochs": 1}),
                              search_study.open_storage(opts.storage), opts.study_name)
    for width1 in (9, 12, 9):  # fail, rejected, complete: in this order
        study.enqueue_trial({"model.width1": width1})
    fit_that(monkeypatch, raise_on_call=1, error=RuntimeError("boom"))
    result = search.run_search(opts, mnist=mnist)

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
    recipe = [k for k in trial if not k.startswith(("data.", "target.", "stage"))]
    assert {k: best[k] for k in recipe} == {k: trial[k] for k in recipe}
    assert best["data.val_size"] == 0 and best["stage"] == "search-best"  # trains on all 60,000
    from tracking import stage
    assert stage.main([best_yaml, "--no-progress", "--experiment", "best-rerun", "--train-limit", "256",
                       "--test-limit", "300"]) == 0


def test_an_interrupted_search_resumes_without_repeating_trials(tmp_path, mnist, tracking_uri,
                                                                monkeypatch):
    config = write_search(tmp_path, {**ROTATION, "optim.lr": {"type": "float", "low": 0.001,
                                                              "high": 0.1, "log": True}})
    opts = options(tmp_path, config, storage=f"sqlite:///{tmp_path}/optuna.db")  # RDB + heartbeat
    real_fit = runs.fit
    fit_that(monkeypatch, raise_on_call=2, error=KeyboardInterrupt())  # Ctrl-C in trial 1
    with pytest.raises(KeyboardInterrupt):
        search.run_search(opts, mnist=mnist)
    first_parent = mlflow.search_runs(experiment_names=["search-test"], output_format="list",
                                      filter_string="tags.search_role = 'parent'")[0]
    assert first_parent.info.status == "KILLED"
    interrupted = child_runs(first_parent.info.run_id)[1]
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["trial_state"] == "FAIL"

    monkeypatch.setattr(runs, "fit", real_fit)
    result = search.run_search(opts, mnist=mnist)  # the same command again

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
    result = search.run_search(options(tmp_path, config, n_trials=4, workers=2), mnist=mnist)

    trials = result.study.trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.params["augment.rotation_degrees"] for t in trials}) == 4
    children = child_runs(result.parent_run_id)
    assert [r.data.tags["optuna.trial_number"] for r in children] == ["0", "1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert mlflow.get_run(result.parent_run_id).info.status == "FINISHED"
    assert search_report.counts(result.study)["complete"] == 4


def test_the_pruner_compares_hold_scores_in_the_studys_direction():
    """Reported scores are lower-is-better like the objective: with Optuna's median pruner a
    clearly worse trial is pruned and a clearly better one is not."""
    from mnist_mlflow.train import EpochMetrics
    from tracking.search_objective import HoldReporter

    spec = load_search(SEARCH_YAML)
    study = optuna.create_study(direction="minimize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2))

    def run(val: list[float]) -> str:
        trial = study.ask()
        reporter = HoldReporter(trial, spec)
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
