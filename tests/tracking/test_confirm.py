"""tracking.confirm: candidates from a real study, screening on validation over seeds x precisions
x threads, the winner's final runs, recipe.yaml. Tiny real data, temporary stores, no mocks."""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import math
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.distributions import FloatDistribution

from mnist_mlflow import config as C
from mnist_mlflow.evaluation import hold_summary
from tests.conftest import ROOT
from tests.tracking.search.helpers import ROTATION, options, write_search
from tracking import confirm, promote, report
from tracking.search.run import run_search
from tracking.search.space import load_search
from tracking.search.study import open_storage
from tracking import confirm_report as R

STAGE3 = ROOT / "experiments/stage3.yaml"
QUICK = "data.val_size=500 device=cpu optim.batch_size=32 optim.ema_decay=0.9 target.accuracy=20 target.hold=1"


def screen(candidate: str, val: list[float], threshold: float = 99.4, hold: int = 2) -> R.ScreenRun:
    return R.screen_run(candidate, 1, "fp32", 1, "r", val, threshold, hold)


# ---------------------------------------------------------------- ranking

def test_rank_prefers_more_holds_then_an_earlier_hold_then_higher_held_accuracy():
    screens = [
        screen("late", [99.0, 99.5, 99.5, 99.5]), screen("late", [99.0, 99.0, 99.5, 99.5]),  # 2 holds
        screen("early", [99.5, 99.5, 99.0, 99.0]), screen("early", [99.45, 99.45, 99.0, 99.0]),
        screen("once", [99.9, 99.9, 99.9, 99.9]), screen("once", [99.0, 99.0, 99.0, 99.0]),
        screen("never", [99.39, 99.39, 99.39, 99.39]), screen("never", [99.0, 99.39, 99.0, 99.0]),
        screen("worst", [98.0, 98.0, 98.0, 98.0]), screen("worst", [98.0, 98.0, 98.0, 98.0]),
    ]
    order = [s.candidate for s in R.rank(["worst", "never", "once", "late", "early"], screens)]
    assert order == ["early", "late", "once", "never", "worst"]
    early = R.score("early", screens)
    assert (early.holds, early.hold_epoch_mean, early.held_accuracy_mean) == (2, 2.0, pytest.approx(99.475))
    assert math.isnan(R.score("never", screens).hold_epoch_mean)
    assert "hold_epoch_mean" not in R.score("never", screens).metrics()  # nan is not logged


def test_same_hold_epoch_higher_held_accuracy_wins():
    screens = [screen("a", [99.5, 99.5]), screen("b", [99.6, 99.7])]
    assert [s.candidate for s in R.rank(["a", "b"], screens)] == ["b", "a"]


def _scores(trial: list[list[float]], base: list[list[float]]) -> list[R.Score]:
    screens = [screen("trial-3", v) for v in trial] + [screen("base", v) for v in base]
    return R.rank(["trial-3", "base"], screens)


HELD_AT = {e: [99.0] * (e - 2) + [99.5] * 2 for e in range(2, 15)}  # hold=2 completes at epoch e


@pytest.mark.parametrize("trial, base, sd, winner", [
    ([7, 7], [12, 12], 1.6, "trial-3"),  # 5 epochs earlier > 1.96 * 1.6 * 1 = 3.14
    ([10, 10], [12, 12], 1.6, "base"),  # 2 epochs earlier: within the noise
    ([10, 10], [12, 12], 0.5, "trial-3"),  # a quieter objective resolves 2 epochs
    ([10, 10], [12, 12], None, "trial-3"),  # no sd: the top-ranked wins
    ([12, 12], [10, 10], 1.6, "base"),  # the base ranks first
])
def test_the_base_stays_unless_beaten_beyond_the_noise(trial, base, sd, winner):
    name, why = R.choose(_scores([HELD_AT[e] for e in trial], [HELD_AT[e] for e in base]), "base", sd)
    assert name == winner
    assert ("within the noise" in why) == (winner == "base" and sd is not None and trial[0] < base[0])


def test_a_candidate_that_holds_where_the_base_never_does_wins():
    never = [99.0] * 14
    name, why = R.choose(_scores([HELD_AT[13], HELD_AT[13]], [never, never]), "base", 1.6)
    assert name == "trial-3" and "base in none" in why


def finals(candidate: str, hold_epochs: list) -> list[dict]:
    """Final rows as confirm logs them; None: that seed never held."""
    return [{"candidate": candidate, "held": e is not None, "hold_epoch": e} for e in hold_epochs]


@pytest.mark.parametrize("trial, base, champion, why", [
    ([9] * 10, [10] * 10, "trial-3", "1.00 epochs earlier (needs >= 1)"),  # the bar, just met
    ([10.2] * 5 + [10] * 5, [10.3] * 10, "base", "base stays: "),  # 0.2 earlier: session 20's trial 25
    ([5] * 9 + [None], [10] * 10, "base", "(the winner must hold in all)"),  # early, but one seed missed
    ([12] * 10, [10] * 9 + [None], "trial-3", "trial-3 replaces base: trial-3 held the test target in "
                                              "10 of 10 final runs, base in 9 of 10"),
])
def test_on_test_a_trial_replaces_the_base_only_holding_everywhere_and_a_gain_earlier(trial, base, champion, why):
    name, reason = R.test_verdict("trial-3", finals("trial-3", trial), "base", finals("base", base), 1.0)
    assert name == champion and why in reason


@pytest.mark.parametrize("direction, best_first", [("minimize", [1, 2, 0]), ("maximize", [0, 2, 1])])
def test_top_trials_follow_the_study_direction(direction, best_first):
    study = optuna.create_study(direction=direction)
    dist = {"augment.rotation_degrees": FloatDistribution(0, 15)}
    for number, value in enumerate([9.0, 5.0, 7.0]):
        study.add_trial(optuna.trial.create_trial(
            params={"augment.rotation_degrees": float(number)}, distributions=dist, value=value,
            user_attrs={"config": {"augment.rotation_degrees": float(number)}}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
    assert [t.number for t in confirm.top_trials(study, 5)] == best_first
    assert [t.number for t in confirm.top_trials(study, 2)] == best_first[:2]


def test_identical_configs_are_screened_once():
    base = C.load(STAGE3)
    same = C.replace(base, {"seed": 7, "precision": "fp32", "stage": "other"})
    other = C.replace(base, {"schedule.max_lr": 0.02})
    found = confirm.dedupe([confirm.ScreenedRecipe("trial-0", same, 0, 12.9),
                            confirm.ScreenedRecipe("trial-1", other, 1, 13.5), confirm.ScreenedRecipe("base", base)])
    # trial 0 is the base recipe: screened once, as the base (found on real MNIST: with trial 0 the
    # best trial and --top 1, the noise rule found no base and confirm failed, StopIteration)
    assert [(c.name, c.trial, c.value) for c in found] == [("base", 0, 12.9), ("trial-1", 1, 13.5)]
    assert found[0].config == base


# ---------------------------------------------------------------- recipe.yaml

def test_recipe_is_extends_stage3_plus_only_the_keys_that_differ(tmp_path):
    stage3 = C.load(STAGE3)
    cfg = C.replace(stage3, {"schedule.max_lr": 0.02, "augment.thickness_prob": 0.1, "seed": 4,
                             "stage": "confirm", "data.val_size": 5000, "data.train_limit": 100,
                             "target.accuracy": 20.0, "device": "cpu"})
    text = C.derived_yaml(cfg, STAGE3, "why\n\nhow")
    assert text.startswith("# why\n#\n# how\n")
    raw = yaml.safe_load(text)
    assert raw == {"extends": "stage3.yaml", "augment": {"thickness_prob": 0.1},
                   "schedule": {"max_lr": 0.02}}
    back = read_back(text, tmp_path)
    assert C.flatten(back) == C.flatten(C.replace(stage3, {"schedule.max_lr": 0.02,
                                                           "augment.thickness_prob": 0.1}))
    assert yaml.safe_load(C.derived_yaml(stage3, STAGE3)) == {"extends": "stage3.yaml"}


def read_back(recipe: str, folder: Path) -> C.RunConfig:
    """recipe.yaml copied next to stage3.yaml, as its header says, and loaded as a run would."""
    (folder / STAGE3.name).write_text(STAGE3.read_text())
    (folder / "recipe.yaml").write_text(recipe)
    return C.load(folder / "recipe.yaml")


# ---------------------------------------------------------------- the CLI

@pytest.fixture
def study(tmp_path, mnist, tracking_uri):
    """A real 2-trial study on slivers of MNIST (tracking.search, as a user runs it)."""
    config = write_search(tmp_path, ROTATION)
    result = run_search(options(tmp_path, config, n_trials=2), mnist=mnist)
    assert result.best is not None
    return config, options(tmp_path, config).storage, result


def argv(config: Path, storage: str, *extra: str) -> list[str]:
    return ["--config", str(config), "--storage", storage, "--study-name", "test-study",
            "--train-limit", "500", "--test-limit", "300", "--epochs", "1", "--set", QUICK,
            "--experiment", "confirm-test", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--precisions", "fp16"], "--precisions='fp16' is not allowed"),
    (["--threads", "0,1"], "--threads='0,1' is not allowed"),
    (["--seeds", "two"], "--seeds='two' is not an integer"),
    (["--study-name", "nope"], "no study 'nope' in storage"),
    (["--set", "model.width1=40"], "over the budget"),  # the base: the study has no trial yet
    (["--seeds", "0"], "--seeds 0 ranks on the search's own runs, but base is not in the study"),
    (["--min-test-gain", "nan"], "--min-test-gain=nan is not allowed: a finite number of epochs"),
])
def test_bad_input_exits_2_before_any_run(tmp_path, tracking_uri, capsys, extra, message):
    storage = f"journal:{tmp_path}/optuna.log"
    optuna.create_study(study_name="test-study", storage=open_storage(storage))
    assert confirm.main(argv(write_search(tmp_path, ROTATION), storage) + extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_the_plan_carries_the_test_verdicts_flags(tmp_path):
    storage = f"journal:{tmp_path}/optuna.log"
    optuna.create_study(study_name="test-study", storage=open_storage(storage))
    config = write_search(tmp_path, ROTATION)
    plan = confirm.make_plan(confirm.parser().parse_args(argv(config, storage)))
    assert (plan.test_winner, plan.min_test_gain) == (True, confirm.MIN_TEST_GAIN)
    plan = confirm.make_plan(confirm.parser().parse_args(
        argv(config, storage, "--test-winner", "false", "--min-test-gain", "0.5")))
    assert (plan.test_winner, plan.min_test_gain) == (False, 0.5)


@pytest.mark.slow  # an end-to-end chain of several trainings: the whole suite runs it
def test_screens_on_validation_picks_the_winner_and_confirms_it(study, tmp_path, capsys):
    config, storage, result = study
    code = confirm.main(argv(config, storage, "--top", "1", "--seeds", "1", "--precisions", "bf16,fp32",
                             "--threads", "1,2", "--final-seeds", "1", "--final-precisions", "fp32"))
    assert code == 0
    client = MlflowClient()
    exp = client.get_experiment_by_name("confirm-test").experiment_id
    (parent,) = client.search_runs([exp], "tags.confirm_role = 'parent'")
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{pid}'")
    assert all(r.info.status == "FINISHED" for r in children)
    screens = [r for r in children if r.data.tags["confirm_role"] == "screen"]
    finals = [r for r in children if r.data.tags["confirm_role"] == "final"]
    (final,) = [r for r in finals if r.data.tags["confirm_candidate"] == parent.data.tags["champion"]]

    # candidates: the study's best trial (in its own direction) and the search file's base
    best = f"trial-{result.study.best_trial.number}"
    assert parent.data.params["confirm.candidates"] == f"{best},base"
    grid = {(r.data.tags["confirm_candidate"], r.data.params["seed"], r.data.params["precision"],
             r.data.params["threads"]) for r in screens}
    assert grid == set(itertools.product([best, "base"], ["1"], ["bf16", "fp32"], ["1", "2"]))
    for r in screens:
        assert r.data.params["hw.threads"] == r.data.params["threads"]
        assert r.data.params["data.val_size"] == "500" and r.data.params["data.train_size"] == "500"

    # the winner: the best by validation histories, recomputed here from the logged metrics, and
    # the base unless that one beats it beyond the file's noise (which one depends on the CPU)
    logged = [R.ScreenRun(r.data.tags["confirm_candidate"], 1, "", 1, r.info.run_id, val,
                          hold_summary(val, 20.0, 1))
              for r in screens
              for val in [[m.value for m in sorted(client.get_metric_history(r.info.run_id, "val_accuracy"),
                                                   key=lambda m: m.step)]]]
    ranked = R.rank([best, "base"], logged)
    winner, _ = R.choose(ranked, "base", load_search(config).settings.hold_epoch_sd)
    assert parent.data.tags["winner"] == winner  # a trial that won: the base's finals too
    assert sorted(r.data.tags["confirm_candidate"] for r in finals) == sorted({winner, "base"})
    assert parent.data.metrics[f"screen.{ranked[0].candidate}.rank"] == 1
    assert parent.data.metrics[f"screen.{winner}.runs"] == 4
    table = mlflow.artifacts.load_text(f"runs:/{pid}/screening.md")
    assert len(table.strip().splitlines()) == 2 + 8 and "| candidate | seed | precision | threads | held |" in table

    # final: all training images (no validation split), test reported, a model to promote
    assert final.data.params["data.val_size"] == "0" and "test_accuracy" in final.data.metrics
    assert client.search_logged_models([exp], filter_string=f"source_run_id = '{final.info.run_id}'")
    assert parent.data.metrics["final.seeds"] == 1
    assert "figures/seeds.png" in {a.path for a in client.list_artifacts(pid, "figures")}

    # recipe.yaml: extends stage 3, only the differences, and it is the final run's config
    text = mlflow.artifacts.load_text(f"runs:/{pid}/recipe.yaml")
    raw = yaml.safe_load(text)
    assert list(raw)[0] == "extends" and raw["extends"] == "stage3.yaml"
    flat_stage3 = C.flatten(C.load(STAGE3))
    recipe = C.flatten(read_back(text, tmp_path))
    changes = {k: v for k, v in recipe.items() if not k.startswith(C.NOT_RECIPE) and v != flat_stage3[k]}
    assert changes and all(flat_stage3[k] != v for k, v in changes.items())
    for key, value in recipe.items():
        if not key.startswith(C.NOT_RECIPE + ("precision",)):
            assert final.data.params[key] == str(value), key
    out = capsys.readouterr().out
    assert f"mlflow artifacts download -r {pid} -a recipe.yaml -d ." in out


@pytest.mark.slow  # nine 1-epoch trainings
def test_a_trial_that_wins_validation_trains_the_bases_finals_and_only_the_champion_is_promoted(
        tmp_path, mnist, tracking_uri, capsys):
    """The base here cannot learn (peak learning rate 1e-9): the trial wins screening, the base
    trains the same final seed, the test verdict names the trial, and promote takes its run."""
    quick = dict(C.parse_override(o) for o in QUICK.split())
    spec = load_search(write_search(tmp_path, ROTATION),
                       {**quick, "data.train_limit": 1000, "data.test_limit": 300, "optim.epochs": 1})
    good = C.replace(spec.base, {"stage": "confirm"})
    plan = confirm.ConfirmPlan(
        spec, (confirm.ScreenedRecipe("trial-1", good, 1, 1.0),
               confirm.ScreenedRecipe("base", C.replace(good, {"schedule.max_lr": 1e-9}))),
        seeds=(1,), precisions=("fp32",), threads=(1,), final_seeds=(1,), final_precisions=("fp32",),
        threshold=20.0, study_name="s", storage="none")
    mlflow.set_experiment("confirm-test")
    pid = confirm.run_confirm(plan, mnist)

    client = MlflowClient()
    parent = client.get_run(pid)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}'")
    by_role = {(r.data.tags["confirm_role"], r.data.tags["confirm_candidate"]): r for r in children}
    assert set(by_role) == {(role, c) for role in ("screen", "final") for c in ("trial-1", "base")}
    assert parent.data.tags["winner"] == parent.data.tags["champion"] == "trial-1"
    assert parent.data.tags["champion_reason"].startswith("trial-1 replaces base: ")
    rows = list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"runs:/{pid}/final.csv"))))
    assert [(r["candidate"], r["held"]) for r in rows] == [("trial-1", "True"), ("base", "False")]
    assert parent.data.metrics["final.trial-1.holds"] == 1 and parent.data.metrics["final.base.holds"] == 0

    assert report.main(["--confirm", "latest"]) == 0  # docs' confirm page: choice, finals, champion
    text = capsys.readouterr().out
    for part in ("# Confirm (study s)", "Winner: trial-1. ", "| candidate | seed | precision | held |",
                 "Champion: trial-1. trial-1 replaces base: "):
        assert part in text, part

    result = promote.promote("confirmed", target=20.0, hold=1, mnist=mnist, parent_run_id=pid)
    assert result.run_id == by_role["final", "trial-1"].info.run_id
    client.set_tag(pid, "champion", "base")  # had the base stayed: its runs only, and none held
    with pytest.raises(promote.NoCandidate, match=r"\(its champion base\)"):
        promote.promote("confirmed", target=20.0, hold=1, dry_run=True, parent_run_id=pid)

    # no time for two final sets (tune: --test-winner false): the winner is not tested, the base stays
    pid = confirm.run_confirm(dataclasses.replace(plan, test_winner=False), mnist)
    parent = client.get_run(pid)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{pid}'")
    assert sorted((r.data.tags["confirm_role"], r.data.tags["confirm_candidate"]) for r in children) == [
        ("final", "base"), ("screen", "base"), ("screen", "trial-1")]
    assert parent.data.tags["winner"] == "trial-1" and parent.data.tags["champion"] == "base"
    assert "not tested against it on the same final seeds (--test-winner false)" in parent.data.tags["champion_reason"]


@pytest.mark.slow  # a search, then confirm's final run
def test_seeds_0_ranks_on_the_searchs_own_runs_and_trains_no_screening_run(tmp_path, mnist, tracking_uri):
    """The base enqueued and every held trial raced on 2 seeds: confirm reads those runs back."""
    config = write_search(tmp_path, ROTATION, enqueue_base=True, race={"seeds": 2, "margin": 100.0})
    quick = ("data.val_size=500", "device=cpu", *QUICK.split())
    result = run_search(options(tmp_path, config, epochs=2, train_limit=1000, overrides=quick), mnist=mnist)
    study = result.study
    raced = {t.number: t.user_attrs["seed_scores"] for t in study.trials if t.state.name == "COMPLETE"}
    assert raced.get(0) and set(raced[0]) == {"1", "2"}  # the base held and raced: two runs to read

    assert confirm.main(argv(config, options(tmp_path, config).storage, "--top", "1", "--seeds", "0",
                             "--final-seeds", "1", "--final-precisions", "fp32")) == 0
    client = MlflowClient()
    exp = client.get_experiment_by_name("confirm-test").experiment_id
    (parent,) = client.search_runs([exp], "tags.confirm_role = 'parent'")
    pid = parent.info.run_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{pid}'")
    roles = [r.data.tags["confirm_role"] for r in children]
    assert roles == ["final"] * (1 if parent.data.tags["winner"] == "base" else 2)  # nothing screened here
    assert parent.data.params["confirm.screening"] == "search runs"

    # the screening table is the search's runs: each candidate's trial run and race-seed runs
    rows = list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"runs:/{pid}/screening.csv"))))
    candidates = parent.data.params["confirm.candidates"].split(",")
    assert "base" in candidates and {r["candidate"] for r in rows} == set(candidates)
    trial_of = {c: int(c.split("-")[1]) for c in candidates if c != "base"}
    trial_of.setdefault("base", 0)
    for name, number in trial_of.items():
        runs = {r["run_id"]: r for r in rows if r["candidate"] == name}
        trial = study.trials[number]
        expected = {trial.user_attrs["mlflow_run_id"]} | {
            r.info.run_id for r in client.search_runs(
                [trial.user_attrs["mlflow_experiment_id"]],
                f"tags.`mlflow.parentRunId` = '{trial.user_attrs['mlflow_run_id']}' and attributes.status = 'FINISHED'")}
        assert set(runs) == expected, name
        assert sorted(r["seed"] for r in runs.values()) == sorted(trial.user_attrs["seed_scores"])
        for run_id, row in runs.items():
            val = [m.value for m in sorted(client.get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step)]
            assert float(row["final_val_accuracy"]) == pytest.approx(val[-1])
    assert {r.data.tags["confirm_candidate"] for r in children} == {parent.data.tags["winner"], "base"}
