"""tracking.tune: search -> confirm -> promote as child runs of one tune run, real processes."""

from __future__ import annotations

import os
import re
import shlex
import sys

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import ROOT
from tests.tracking.search.helpers import ROTATION, write_search
from mnist_mlflow import threads as T
from tracking import cli, confirm, promote, report, tune, tune_time
from tracking.search import cli as search_cli
from tracking.search.space import load_search

QUICK = "data.val_size=500 device=cpu optim.batch_size=32 optim.ema_decay=0.9"


@pytest.fixture
def env(tracking_uri, monkeypatch):
    """The steps are subprocesses: they import this checkout's packages."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return tracking_uri


def runs_of(exp_name: str, where: str = "") -> list:
    client = MlflowClient()
    exp = client.get_experiment_by_name(exp_name)
    return client.search_runs([exp.experiment_id], where) if exp else []


@pytest.mark.parametrize("extra, message", [
    (["--precisions", "fp16"], "--precisions='fp16' is not allowed"),
    (["--target", "ninety"], "--target='ninety' is not a number"),
    (["--target", "0"], "--target 0.0 is not allowed"),
    (["--model-name", "a/b"], "--model-name 'a/b' is not allowed"),
    (["--n-trials", "0"], "--n-trials='0' is not allowed"),
    (["--probe-batches", "0"], "--probe-batches='0' is not allowed"),
    ([], "--seeds 0 ranks the candidates on the search's own runs and needs the base"),  # none enqueued
])
def test_bad_input_exits_2_before_any_run(tmp_path, env, capsys, extra, message):
    assert tune.main(["--config", str(write_search(tmp_path, ROTATION)), "--experiment", "t", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_each_step_reads_tunes_flags_with_its_own_parser():
    args = tune.parser().parse_args([
        "--n-trials", "3", "--budget-minutes", "1.5", "--epochs", "2", "--train-limit", "1000",
        "--set", "data.val_size=500 device=cpu", "--set", "optim.lr=0.01", "--top", "1",
        "--precisions", "bf16,fp32", "--final-seeds", "3", "--model-name", "m", "--target", "20",
        "--hold", "1", "--experiment", "not passed on"])
    steps = [(tune.search_step(args, "sqlite:///s.db", "study", 1.5), "tracking.search", search_cli.parser(),
              tune.SEARCH_FLAGS),
             (tune.confirm_step(args, "sqlite:///s.db", "study"), "tracking.confirm", confirm.parser(),
              tune.CONFIRM_FLAGS),
             (tune.promote_step(args, "confirm-run"), "tracking.promote", promote.parser(),
              tune.PROMOTE_FLAGS)]
    for step, module, step_parser, dests in steps:
        assert step.argv[:3] == [sys.executable, "-m", module]
        got = step_parser.parse_args(step.argv[3:])
        assert {d: getattr(got, d) for d in dests} == {d: getattr(args, d) for d in dests}, module
        assert "--experiment" not in step.argv and "--from-experiment" not in step.argv
    search, confirmed, promoted = (p.parse_args(s.argv[3:]) for s, _, p, _ in steps)
    assert (search.n_trials, search.budget_minutes, search.test_limit) == (3, 1.5, None)
    assert search.hard_budget is True  # the chain's share of the time ends the search
    assert search.overrides == confirmed.overrides == ["data.val_size=500 device=cpu", "optim.lr=0.01"]
    for got in (search, confirmed):
        assert (got.config, got.storage, got.study_name) == (args.config, "sqlite:///s.db", "study")
    assert (confirmed.top, confirmed.seeds, confirmed.precisions) == (1, 0, "bf16,fp32")  # tune's defaults
    assert (promoted.model_name, promoted.target, promoted.hold, promoted.parent_run_id) == (
        "m", 20.0, 1, "confirm-run")
    assert promoted.config == str(ROOT / "experiments/stage3.yaml")  # not tune's search file


def test_confirm_is_timed_first_and_the_search_gets_what_is_left(tmp_path, mnist):
    config = write_search(tmp_path, ROTATION)
    args = tune.parser().parse_args(["--config", str(config), "--train-limit", "2000", "--test-limit", "500",
                                     "--set", QUICK, "--top", "1", "--seeds", "2", "--threads", "1, 2",
                                     "--precisions", "fp32 ",  # spaces: as tune.check reads them
                                     "--final-seeds", "3", "--total-minutes", "40"])
    spec, _, _ = tune.check(args)
    chain = tune_time.plan_chain(spec, args, mnist, probe_batches=4)  # the arithmetic, not the clock
    s = chain.epoch_seconds
    assert set(s) == {"screen fp32 t1", "screen fp32 t2", f"final fp32 t{T.TORCH_DEFAULT}"}
    screen = (1 + 1) * 2 * spec.horizon * (s["screen fp32 t1"] + s["screen fp32 t2"])
    final = 2 * 3 * spec.horizon * s[f"final fp32 t{T.TORCH_DEFAULT}"]  # the winner's, and the base's
    assert chain.confirm == pytest.approx(tune_time.MARGIN * (screen + final) / 60)
    assert (chain.screen_runs, chain.final_runs, chain.epochs) == (8, 6, spec.horizon)
    assert chain.search == pytest.approx(min(60, 40 - chain.confirm - tune_time.OVERHEAD_MINUTES))
    args.seeds = 0  # tune's default: the search's own runs rank the candidates, nothing to time
    spec = load_search(write_search(tmp_path, ROTATION, enqueue_base=True), cli.overrides(args, confirm.CONFIG_FLAGS))
    chain = tune_time.plan_chain(spec, args, mnist, probe_batches=4)
    assert set(chain.epoch_seconds) == {f"final fp32 t{T.TORCH_DEFAULT}"} and chain.screen_runs == 0
    final = 2 * 3 * spec.horizon * chain.epoch_seconds[f"final fp32 t{T.TORCH_DEFAULT}"]
    assert chain.confirm == pytest.approx(tune_time.MARGIN * final / 60)
    args.total_minutes = 14  # leaves the search less than 10 minutes
    with pytest.raises(tune_time.ChainTooLong, match=r"--total-minutes=14 is not enough here: .* allow at least"):
        tune_time.plan_chain(spec, args, mnist, probe_batches=4)


def test_a_chain_too_long_names_the_final_seeds_that_fit(tmp_path, monkeypatch):
    """The arithmetic of the suggestion, on a fixed clock: a screening epoch (50,000 training
    images and validation) 6 s, a final one (all 60,000) 12 s. Two final sets (a winner's and
    the base's) that leave the search too little fall back to one, untested winner (the base stays)."""
    monkeypatch.setattr(tune_time, "epoch_seconds", lambda cfg, mnist, train, *_: 12.0 if train == 60_000 else 6.0)
    args = tune.parser().parse_args(["--config", str(write_search(tmp_path, ROTATION)), "--set", QUICK,
                                     "--top", "1", "--seeds", "1", "--threads", "2", "--final-seeds", "10"])
    spec, _, _ = tune.check(args)
    screen_min, seed_min = 2 * spec.horizon * 6 / 60, spec.horizon * 12 / 60  # 2 runs; one final run
    fit = 4  # the total leaves room for 4.5 final runs besides screening, overhead and the search
    args.total_minutes = (tune_time.OVERHEAD_MINUTES + tune_time.MIN_SEARCH_MINUTES
                          + tune_time.MARGIN * (screen_min + (fit + 0.5) * seed_min))
    with pytest.raises(tune_time.ChainTooLong,
                       match=rf"or --final-seeds 2 \(the most that fit\) \({fit} if a winner may go untested\)$"):
        tune_time.plan_chain(spec, args, None)
    args.final_seeds = fit  # one set of 4 fits, two do not: the winner goes untested
    chain = tune_time.plan_chain(spec, args, None)
    assert chain.search >= tune_time.MIN_SEARCH_MINUTES and chain.final_runs == fit
    assert not chain.test_winner and "not tested against stage 3" in chain.line()
    assert "two final sets would leave the search too little" in chain.line()
    assert tune.confirm_step(args, "s", "t", chain.test_winner).argv[-2:] == ["--test-winner", "false"]
    args.final_seeds = 2  # two sets of 2 fit: a winner faces the base
    chain = tune_time.plan_chain(spec, args, None)
    assert chain.test_winner and chain.final_runs == 4 and "not tested" not in chain.line()
    args.test_winner = False  # asked for: one set, said so
    chain = tune_time.plan_chain(spec, args, None)
    assert chain.final_runs == 2 and chain.line().endswith("so stage 3 stays (--test-winner false)")
    args.test_winner, args.top = True, 0  # only the base: one set, and no winner to test
    chain = tune_time.plan_chain(spec, args, None)
    assert chain.final_runs == 2 and chain.test_winner and "not tested" not in chain.line()
    args.top, args.final_seeds = 1, 10
    args.total_minutes = (tune_time.OVERHEAD_MINUTES + tune_time.MIN_SEARCH_MINUTES
                          + tune_time.MARGIN * (screen_min + 1.5 * seed_min))  # one run fits, two do not
    with pytest.raises(tune_time.ChainTooLong, match=r"or --final-seeds 1 \(the most that fit; a winner then goes untested\)$"):
        tune_time.plan_chain(spec, args, None)
    args.total_minutes, args.final_seeds = 40, fit
    args.budget_minutes = 5  # a short search asked for is not a chain too long
    assert tune_time.plan_chain(spec, args, None).search == 5
    args.budget_minutes = None
    args.total_minutes = tune_time.OVERHEAD_MINUTES + tune_time.MIN_SEARCH_MINUTES + 1  # not even screening
    with pytest.raises(tune_time.ChainTooLong, match=r"or fewer --seeds or --top$"):
        tune_time.plan_chain(spec, args, None)
    args.total_minutes = tune_time.OVERHEAD_MINUTES + tune_time.MIN_SEARCH_MINUTES - 1  # nothing but more time
    with pytest.raises(tune_time.ChainTooLong, match=r"allow at least \d+$"):
        tune_time.plan_chain(spec, args, None)


@pytest.mark.slow  # the whole command, its data load and both probes
def test_a_chain_that_cannot_fit_its_time_exits_2_before_any_run(tmp_path, env, capsys):
    code = tune.main(["--config", str(write_search(tmp_path, ROTATION, enqueue_base=True)), "--experiment", "t",
                      "--train-limit", "1000", "--set", QUICK, "--total-minutes", "12",
                      "--probe-batches", "4"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--total-minutes=12 is not enough here" in err and len(err.strip().splitlines()) == 1
    assert mlflow.search_runs(search_all_experiments=True).empty


@pytest.mark.slow  # the search step is a process of its own
def test_a_failing_step_fails_the_chain_and_stops_it(tmp_path, env, capsys):
    # the search step refuses a journal file in a folder that does not exist (its exit 2)
    code = tune.main(["--config", str(write_search(tmp_path, ROTATION, enqueue_base=True)), "--experiment", "t",
                      "--storage", f"journal:{tmp_path}/missing/optuna.log", "--n-trials", "1",
                      "--train-limit", "1000", "--set", QUICK, "--probe-batches", "4"])  # confirm's timing: quick
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: step search failed (exit 2") and "does not exist" in err[-1]
    (parent,) = runs_of("t", "tags.stage = 'tune'")
    steps = runs_of("t", f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.status == "FAILED"
    assert [(r.data.tags["tune_step"], r.info.status, r.data.tags["exit_code"]) for r in steps] == [
        ("search", "FAILED", "2")]  # confirm and promote never started
    assert "does not exist" in mlflow.artifacts.load_text(f"runs:/{steps[0].info.run_id}/output.txt")


@pytest.mark.parametrize("entry, module", [("confirm", "tracking.confirm"), ("tune", "tracking.tune")])
def test_mlproject_entries_pass_every_parameter_and_empty_means_the_default(entry, module):
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry]
    params = spec["parameters"]
    argv = shlex.split(spec["command"].format(**{k: shlex.quote(v["default"]) for k, v in params.items()}))
    assert argv[:3] == ["python", "-m", module]
    args = {"confirm": confirm.parser, "tune": tune.parser}[entry]().parse_args(argv[3:])
    for name in params:
        assert hasattr(args, name if name != "set" else "overrides"), name
    flags = {a.split("=")[0] for a in argv if a.startswith("--")}
    assert {f"--{n.replace('_', '-')}" for n in params} <= flags
    assert args.test_winner is True and args.min_test_gain == 1.0  # '' is the default
    if entry == "confirm":
        assert set(params) == {"config", "storage", "study_name", "top", "seeds", "precisions", "threads",
                               "final_seeds", "final_precisions", "min_test_gain", "test_winner", "epochs", "train_limit",
                               "test_limit", "set"}
    else:
        assert {"n_trials", "top", "final_seeds", "model_name", "target", "hold"} <= set(params)


@pytest.mark.slow
def test_tune_goes_from_nothing_to_the_champion(tmp_path, env, capsys):
    config = write_search(tmp_path, ROTATION)
    code = tune.main(["--config", str(config), "--experiment", "tune", "--n-trials", "2",
                      "--epochs", "1", "--train-limit", "1000", "--test-limit", "300",
                      "--storage", f"sqlite:///{tmp_path}/optuna.db", "--study-name", "quick",
                      "--top", "1", "--seeds", "1", "--precisions", "fp32", "--threads", "1",
                      "--final-seeds", "1", "--final-precisions", "bf16,fp32", "--set", QUICK,
                      "--model-name", "tune-test", "--target", "20", "--hold", "1",
                      "--probe-batches", "4"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    client = MlflowClient()
    (parent,) = runs_of("tune", "tags.stage = 'tune'")
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED"
    steps = {r.data.tags["tune_step"]: r for r in runs_of("tune", f"tags.`mlflow.parentRunId` = '{pid}'")}
    assert set(steps) == {"search", "confirm", "promote"}
    for name, run in steps.items():
        assert run.info.status == "FINISHED" and run.data.tags["exit_code"] == "0"
        assert parent.data.tags[f"step.{name}.run_id"] == run.info.run_id
    assert parent.data.params["tune.study_name"] == "quick"
    assert parent.data.params["tune.storage"] == f"sqlite:///{tmp_path}/optuna.db"
    # the chain's time: confirm's runs timed first, the search got the file's 60 minutes and ends by them
    assert parent.data.params["tune.total_minutes"] == "150.0" and parent.data.params["tune.search_minutes"] == "60.0"
    assert float(parent.data.params["tune.confirm_estimate_minutes"]) < 5
    assert parent.data.params["tune.probe_batches"] == "4"
    assert steps["search"].data.params["search.hard_budget"] == "True"
    assert steps["search"].data.params["search.timeout"] == "3600.0"
    assert 0 < parent.data.metrics["minutes"] < 30

    # each step logged into its own run: the trials nest under search, confirm's runs under confirm
    search_id, confirm_id = steps["search"].info.run_id, steps["confirm"].info.run_id
    trials = runs_of("tune", f"tags.`mlflow.parentRunId` = '{search_id}'")
    assert len(trials) == 2 and steps["search"].data.params["search.study_name"] == "quick"
    confirmed = runs_of("tune", f"tags.`mlflow.parentRunId` = '{confirm_id}'")
    roles = sorted(r.data.tags["confirm_role"] for r in confirmed)
    winner = steps["confirm"].data.tags["winner"]  # a trial that won: the base's finals too
    assert roles == ["final"] * (2 if winner == "base" else 4) + ["screen", "screen"]  # 2 candidates; 1 seed x 2
    assert "recipe.yaml" in {a.path for a in client.list_artifacts(confirm_id)}

    # the champion is one of confirm's final runs, recorded on the parent and the promote run
    champion = client.get_model_version_by_alias("tune-test", promote.ALIAS)
    chosen = steps["confirm"].data.tags["champion"]
    finals = {r.info.run_id for r in confirmed
              if r.data.tags["confirm_role"] == "final" and r.data.tags["confirm_candidate"] == chosen}
    assert champion.run_id in finals and parent.data.tags["confirm_champion"] == chosen
    assert parent.data.tags["model_version"] == str(champion.version)
    assert parent.data.tags["model_uri"] == "models:/tune-test@champion"
    promote_run = client.get_run(steps["promote"].info.run_id)
    assert promote_run.data.tags["model_run_id"] == champion.run_id
    assert "promoted: run" in mlflow.artifacts.load_text(f"runs:/{promote_run.info.run_id}/output.txt")
    assert "models:/tune-test@champion is version 1" in out

    # the chain's report (docs/tune.md): its steps, trials, screening, choice and final seeds
    assert report.main(["--tune", "latest"]) == 0
    text = capsys.readouterr().out
    for part in ("| search | FINISHED |", "| confirm | FINISHED |", "| promote | FINISHED |",
                 "Trials: ", "epochs trained", "## Search", "| number | trial_state | value | last_epoch | epochs_trained |",
                 "| rotation_degrees |", "Winner: ", f"Champion: {chosen}. ",
                 parent.data.tags["model_uri"], "| candidate | seed | precision | held |"):
        assert part in text, part
    assert " minutes of the 150 it was given." in text  # and what tune planned for each step:
    assert re.search(r"\| search \| FINISHED \| [0-9.]+ \| 60\.0 \|", text)
    assert re.search(r"\| promote \| FINISHED \| [0-9.]+ \| - \|", text)
    assert report.main(["--tune", "latest", "--experiment", "no-such-experiment"]) == 2
