"""Confirms the search's best recipes: retrains them over seeds and numerics, picks one, proves it.

    python -m tracking.confirm --study-name mnist-search

All as nested MLflow runs under one parent run:

1. Candidates: the study's best `--top` COMPLETE trials (ranked in the study's own direction),
   each with the exact config it trained, plus the search file's base config; duplicates once.
2. Screening, on the search's training/validation split: every candidate under seeds 1..S x
   precisions x thread counts. Seeds and numerics stand in for other machines: a recipe that
   holds only under one set of kernels is not confirmed. Each candidate is scored from its
   VALIDATION histories, never the test set: how many runs held the validation threshold
   (target.accuracy + the search's val_margin) for target.hold epochs, then the mean epoch at
   which the hold completed, then the mean held accuracy. ``--seeds 0`` trains no screening
   run: it ranks on the search's own finished runs of each candidate (the seeds it raced them
   on, same split and threshold; tracking/search_seeds.py), which needs the base in the study.
3. Final: the winner over seeds 1..F x precisions on all 60,000 training images, test set
   reported, models logged (tracking.promote can register one). A winner other than the base
   must also beat it on test: the base trains the same final seeds, and the winner becomes the
   champion only if it held in every final run with a mean hold epoch at least
   ``--min-test-gain`` (1) epochs earlier; otherwise the base is the champion (tag
   ``champion``; tracking.promote registers only the champion's runs). ``--test-winner false``
   (tune's, when two final sets do not fit its time): only the base's final runs, the base
   stays. The parent logs the champion's consistency summary and per-seed curves, every final
   run's row, and recipe.yaml: ``extends: stage3.yaml`` plus only the keys that differ from
   experiments/stage3.yaml.

Exit codes: 0 done; 2 bad input (nothing created); 130 or 143 interrupted by Ctrl-C or
SIGTERM (runs ended KILLED).

Over 300 lines on purpose: the procedure reads in the order it runs (candidates, numerics,
screening, final runs, what the parent logs, the CLI); its pure decisions and tables are
tracking/confirm_report.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import mlflow
import optuna
import sqlalchemy.exc
import torch
from mlflow.exceptions import MlflowException

from mnist_mlflow import config as C
from mnist_mlflow.data import DataError, Mnist
from mnist_mlflow.models import BudgetError, build_model
from tracking import confirm_report as R
from tracking import cli, consistency, search_seeds
from tracking.lifecycle import mlflow_run, runs
from tracking.cli import markdown
from tracking.lifecycle.signals import exit_code
from tracking.promotion.candidates import CANDIDATE_TAG, CHAMPION_TAG
from tracking.search import names as N
from tracking.search.plan import DEFAULT_CONFIG
from tracking.search.space import SearchSpec, load_search
from tracking.search.study import open_storage, redact

STAGE3 = cli.STAGE3  # what recipe.yaml extends
PRECISIONS = ("bf16", "fp32")
CONFIG_FLAGS = ("epochs", "train_limit", "test_limit")  # the cli.OVERRIDES of every run
RECIPE = "recipe.yaml"
# Where two candidates differ only here, screening would train the same runs twice.
SCREEN_VARIES = ("stage", "seed", "precision", "threads")
MIN_TEST_GAIN = 1.0  # epochs of mean test hold a new recipe must gain over the base (issue 29)


class ConfirmError(RuntimeError):
    """Bad input, found before any run exists."""


@dataclass(frozen=True)
class ScreenedRecipe:
    name: str  # "trial-12" or "base"
    config: C.RunConfig
    trial: Optional[int] = None
    value: Optional[float] = None  # the trial's objective


@dataclass(frozen=True)
class ConfirmPlan:
    spec: SearchSpec
    candidates: tuple[ScreenedRecipe, ...]
    seeds: tuple[int, ...]
    precisions: tuple[str, ...]
    threads: tuple[int, ...]
    final_seeds: tuple[int, ...]
    final_precisions: tuple[str, ...]
    threshold: float  # validation accuracy, percent
    study_name: str
    storage: str
    recorded: tuple[R.ScreenRun, ...] = ()  # no seeds: the search's own runs are the screening
    min_test_gain: float = MIN_TEST_GAIN
    test_winner: bool = True  # False: a trial that wins validation is not tested; the base stays


# ---------------------------------------------------------------- candidates

def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    """The best k COMPLETE trials with a stored config, in the study's direction."""
    if len(study.directions) != 1:
        raise ConfirmError(f"study {study.study_name!r} has {len(study.directions)} objectives; "
                           "confirm ranks by one")
    done = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if N.CONFIG in t.user_attrs and t.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(done, key=lambda t: (-t.value if maximize else t.value, t.number))[:k]


def fixed_values(spec: SearchSpec, overrides: dict) -> dict:
    """What every run shares whatever the candidate: the split, the target, the device and
    the quick-look overrides."""
    base = C.flatten(spec.base)
    shared = {k: v for k, v in base.items() if k.startswith(("data.", "target.")) or k == "device"}
    return {**shared, **overrides}


def trial_config(trial: optuna.trial.FrozenTrial, fixed: dict) -> C.RunConfig:
    try:
        return C.from_dict({}, {**trial.user_attrs[N.CONFIG], **fixed, "stage": "confirm"})
    except C.ConfigError as exc:
        raise ConfirmError(f"trial {trial.number}'s config does not fit this code: {exc}") from exc


def recipe_key(cfg: C.RunConfig) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in C.flatten(cfg).items() if k not in SCREEN_VARIES))


def dedupe(candidates: list[ScreenedRecipe]) -> list[ScreenedRecipe]:
    """One candidate per recipe. A trial that is the base recipe (the enqueued trial 0) is
    screened as the base, in the trial's place, so the noise rule has its base to compare."""
    out: dict[tuple, ScreenedRecipe] = {}
    for c in candidates:
        key = recipe_key(c.config)
        if key not in out:
            out[key] = c
        elif c.name == "base":
            out[key] = dataclasses.replace(c, trial=out[key].trial, value=out[key].value)
    return list(out.values())


def load_study(storage: str, study_name: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        raise ConfirmError(f"no study {study_name!r} in storage {redact(storage)!r}") from None


def load_candidates(spec: SearchSpec, study: optuna.Study, top: int, overrides: dict) -> list[ScreenedRecipe]:
    fixed = fixed_values(spec, overrides)
    found = [ScreenedRecipe(f"trial-{t.number}", trial_config(t, fixed), t.number, t.value)
             for t in top_trials(study, top)]
    base = ScreenedRecipe("base", C.replace(spec.base, {**fixed, "stage": "confirm"}))
    return dedupe(found + [base])


def trial_numbers(study: optuna.Study, candidates: list[ScreenedRecipe],
                  fixed: dict) -> dict[str, Optional[int]]:
    """Each candidate's trial in the study; the base's is its first COMPLETE trial with the
    base config (the enqueued trial 0), when it is not among the top trials."""
    out = {c.name: c.trial for c in candidates}
    base = next(c for c in candidates if c.name == "base")
    if base.trial is None:
        key = recipe_key(base.config)
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            with contextlib.suppress(ConfirmError):  # a resumed study's older trial may not fit
                if N.CONFIG in t.user_attrs and recipe_key(trial_config(t, fixed)) == key:
                    out["base"] = t.number
                    break
    return out


# ---------------------------------------------------------------- numerics

@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def numerics(cfg: C.RunConfig, seed: int, precision: str, threads: int | None = None) -> C.RunConfig:
    """`cfg` under one seed and precision; the thread count goes into the config where it has
    a `threads` key (torch_threads sets it either way)."""
    changes = {"seed": seed, "precision": precision}
    if threads is not None and "threads" in C.flatten(cfg):
        changes["threads"] = threads
    return C.replace(cfg, changes)


def train(cfg: C.RunConfig, mnist: Mnist, threads: int, name: str, tags: dict[str, str],
          log_model: bool) -> runs.RunOutcome:
    with torch_threads(threads):
        outcome = runs.run_training(cfg, mnist=mnist, nested=True, run_name=name, tags=tags,
                                    log_model_artifact=log_model, progress=sys.stderr.isatty())
    mlflow.MlflowClient().log_param(outcome.run_id, "threads", threads)
    return outcome


# ---------------------------------------------------------------- the steps

def screen(plan: ConfirmPlan, mnist: Mnist) -> list[R.ScreenRun]:
    if not plan.seeds:
        print(f"screening: the search's own {len(plan.recorded)} finished runs of the candidates "
              "(--seeds 0), none trained here", flush=True)
        return list(plan.recorded)
    target = plan.spec.base.target
    out = []
    for cand in plan.candidates:
        for seed in plan.seeds:
            for precision in plan.precisions:
                for threads in plan.threads:
                    cfg = numerics(cand.config, seed, precision, threads)
                    name = f"{cand.name}-s{seed}-{precision}-t{threads}"
                    tags = {"confirm_role": "screen", "confirm_candidate": cand.name}
                    o = train(cfg, mnist, threads, name, tags, log_model=False)
                    out.append(R.screen_run(cand.name, seed, precision, threads, o.run_id,
                                            [h.val_accuracy for h in o.result.history],
                                            plan.threshold, target.hold))
                    h = out[-1].hold
                    print(f"screen {name}: validation " + (
                        f"held from epoch {h.target_reached_epoch} (min {h.held_accuracy:.2f}%)"
                        if h.target_reached_epoch else f"longest hold {h.hold_epochs} epochs")
                        + f", final {out[-1].val_accuracy[-1]:.2f}%", flush=True)
    return out


def final(plan: ConfirmPlan, cand: ScreenedRecipe,
          mnist: Mnist) -> tuple[list[runs.RunOutcome], list[dict]]:
    threads = torch.get_num_threads()
    cfg0 = C.replace(cand.config, {"data.val_size": 0})  # all 60,000 training images
    outcomes, rows = [], []
    for seed in plan.final_seeds:
        for precision in plan.final_precisions:
            cfg = numerics(cfg0, seed, precision, threads)
            tags = {"confirm_role": "final", CANDIDATE_TAG: cand.name}
            o = train(cfg, mnist, threads, f"final-{cand.name}-s{seed}-{precision}", tags, log_model=True)
            outcomes.append(o)
            rows.append(R.final_row(cand.name, seed, precision, o.run_id, o.hold,
                                    [h.test_accuracy for h in o.result.history]))
            line = o.summary(cfg).splitlines()
            print(f"final {cand.name} seed {seed} {precision}: {line[1]}; {line[2]}", flush=True)
    return outcomes, rows


def champion_on_test(plan: ConfirmPlan, winner: ScreenedRecipe, mnist: Mnist
                     ) -> tuple[ScreenedRecipe, str, list[runs.RunOutcome], list[dict]]:
    """The winner's final runs and, when it is not the base, the base's on the same seeds (with
    ``test_winner`` False, the base's only): (champion, why, the champion's outcomes, every final row)."""
    base = next(c for c in plan.candidates if c.name == "base")
    if winner.name != "base" and not plan.test_winner:
        outcomes, rows = final(plan, base, mnist)
        return base, (f"base stays: {winner.name} won on validation but is not tested against it on "
                      "the same final seeds (--test-winner false)"), outcomes, rows
    outcomes, rows = final(plan, winner, mnist)
    if winner.name == "base":
        return winner, "base won on validation: its final runs are the champion's", outcomes, rows
    base_outcomes, base_rows = final(plan, base, mnist)
    name, why = R.test_verdict(winner.name, rows, base.name, base_rows, plan.min_test_gain)
    if name == base.name:
        return base, why, base_outcomes, rows + base_rows
    return winner, why, outcomes, rows + base_rows


def run_confirm(plan: ConfirmPlan, mnist: Mnist) -> str:
    """Everything under one parent run (the active one under `mlflow run`); returns its id."""
    with runs.tracked_run(run_name="confirm", tags={"stage": "confirm", "confirm_role": "parent",
                                                    N.STUDY_TAG: plan.study_name}) as parent:
        log_plan(plan)
        screens = screen(plan, mnist)
        scores = R.rank([c.name for c in plan.candidates], screens)
        log_screening(screens, scores)
        name, why = R.choose(scores, "base", plan.spec.settings.hold_epoch_sd)
        winner = next(c for c in plan.candidates if c.name == name)
        hold = plan.spec.base.target.hold
        print("ranking (validation):\n" + "\n".join(f"  {i}. {R.winner_line(s, plan.threshold, hold)}"
                                                    for i, s in enumerate(scores, 1)), flush=True)
        print(f"winner: {why}", flush=True)
        mlflow.set_tags({"winner": winner.name, "winner_reason": why,
                         "winner_trial": "none" if winner.trial is None else winner.trial})
        champion, why, outcomes, rows = champion_on_test(plan, winner, mnist)
        print(f"champion: {why}", flush=True)
        mlflow.set_tags({CHAMPION_TAG: champion.name, "champion_reason": why})
        log_final(plan, champion, outcomes, rows)
    return parent.info.run_id


def log_plan(plan: ConfirmPlan) -> None:
    # Prefixed: under `mlflow run` this run already holds the entry point's raw parameters.
    mlflow.log_params({
        "confirm.config": plan.spec.source, "confirm.study_name": plan.study_name,
        "confirm.storage": redact(plan.storage),
        "confirm.candidates": ",".join(c.name for c in plan.candidates),
        "confirm.seeds": len(plan.seeds), "confirm.screening": "search runs" if not plan.seeds else "trained",
        "confirm.precisions": ",".join(plan.precisions),
        "confirm.threads": ",".join(map(str, plan.threads)),
        "confirm.final_seeds": len(plan.final_seeds),
        "confirm.final_precisions": ",".join(plan.final_precisions),
        "confirm.min_test_gain": plan.min_test_gain, "confirm.test_winner": plan.test_winner,
        "confirm.val_threshold": plan.threshold, "confirm.hold": plan.spec.base.target.hold})
    for c in plan.candidates:
        mlflow.log_text(yaml_of(c.config), f"candidates/{c.name}.yaml")


def yaml_of(cfg: C.RunConfig) -> str:
    import yaml

    return yaml.safe_dump(asdict(cfg), sort_keys=False)


def log_screening(screens: list[R.ScreenRun], scores: list[R.Score]) -> None:
    for i, s in enumerate(scores, 1):
        mlflow.log_metrics({f"screen.{s.candidate}.{k}": v for k, v in {**s.metrics(), "rank": i}.items()})
    rows = [s.row() for s in screens]
    mlflow.log_text(R.csv(rows), "screening.csv")
    mlflow.log_text(markdown(rows), "screening.md")
    mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "screening.json")


def log_final(plan: ConfirmPlan, champion: ScreenedRecipe, outcomes: list[runs.RunOutcome],
              rows: list[dict]) -> None:
    """The champion's summary and curves; every final run's row (the base's too, when it ran)."""
    cfg = champion.config
    stats = consistency.seed_stats(outcomes, cfg)
    mlflow.log_metrics({f"final.{k}": v for k, v in stats.items()})
    for name in dict.fromkeys(r["candidate"] for r in rows):
        held = [r["hold_epoch"] for r in rows if r["candidate"] == name and r["held"]]
        mlflow.log_metrics({f"final.{name}.holds": len(held),
                            **({f"final.{name}.hold_epoch_mean": sum(held) / len(held)} if held else {})})
    mlflow.log_text(R.csv(rows), "final.csv")
    mlflow.log_text(markdown(rows), "final.md")
    labels = [f"{r['seed']} {r['precision']}" for r in rows if r["candidate"] == champion.name]
    histories = [[h.test_accuracy for h in o.result.history] for o in outcomes]
    mlflow.log_figure(consistency.seed_figure(labels, histories, cfg.target.accuracy), "figures/seeds.png")
    consistency.plt.close("all")
    header = (f"Confirmed by tracking.confirm: {champion.name} of study {plan.study_name!r} is the champion.\n"
              f"Final: {stats['seeds_holding']} of {stats['seeds']} runs (seeds "
              f"{plan.final_seeds[0]}-{plan.final_seeds[-1]} x {', '.join(plan.final_precisions)}) "
              f"held >= {cfg.target.accuracy}% test accuracy for {cfg.target.hold} epochs; final "
              f"{stats['final_accuracy_mean']:.2f} +- {stats['final_accuracy_std']:.2f}% "
              f"(min {stats['final_accuracy_min']:.2f}%).\n"
              + data_note(cfg)
              + f"Copy it next to {STAGE3.name} (e.g. experiments/stage3-confirmed.yaml) and run\n"
                "  python -m tracking.stage experiments/stage3-confirmed.yaml")
    mlflow.log_text(C.derived_yaml(cfg, STAGE3, header), RECIPE)
    print(f"{stats['seeds_holding']} of {stats['seeds']} final runs held >= {cfg.target.accuracy}% "
          f"for {cfg.target.hold} epochs within {cfg.optim.epochs} epochs")
    for k, v in stats.items():
        print(f"  {k}: {v:.3f}")


def data_note(cfg: C.RunConfig) -> str:
    d = cfg.data
    if d.train_limit is None and d.test_limit is None:
        return ""
    return (f"A quick look: confirmed on data.train_limit={d.train_limit}, data.test_limit="
            f"{d.test_limit} only (not part of the recipe).\n")


# ---------------------------------------------------------------- CLI

def make_plan(args: argparse.Namespace) -> ConfirmPlan:
    """Every check that needs no run: arguments, search file, study, configs, budget."""
    overrides = cli.overrides(args, CONFIG_FLAGS)
    check_min_test_gain(args.min_test_gain)
    precisions = cli.choice_list("precisions", args.precisions, PRECISIONS)
    threads = cli.int_list("threads", args.threads, 1)
    final_precisions = cli.choice_list("final-precisions", args.final_precisions, PRECISIONS)
    spec = load_search(args.config, overrides)
    s = spec.settings
    storage, study_name = args.storage or s.storage, args.study_name or s.study_name
    study = load_study(storage, study_name)
    candidates = load_candidates(spec, study, args.top, overrides)
    for c in candidates:
        build_model(c.config.model)  # BudgetError: over budget, nothing trains
    threshold = spec.base.target.accuracy + getattr(s, "val_margin", 0.0)
    recorded: list[R.ScreenRun] = []
    if args.seeds == 0:
        trials = trial_numbers(study, candidates, fixed_values(spec, overrides))
        try:
            recorded = search_seeds.recorded_screens(study, trials, threshold, spec.base.target.hold)
        except search_seeds.NoRecordedSeeds as exc:
            raise ConfirmError(str(exc)) from None
    return ConfirmPlan(spec, tuple(candidates), tuple(range(1, args.seeds + 1)), precisions, threads,
                       tuple(range(1, args.final_seeds + 1)), final_precisions, threshold, study_name,
                       storage, tuple(recorded), args.min_test_gain, args.test_winner)


def check_min_test_gain(gain: float) -> None:
    if not math.isfinite(gain):  # nan >= 0 is False: the flag's minimum lets it through
        raise C.ConfigError(f"--min-test-gain={gain:g} is not allowed: a finite number of epochs, 0 or more")


def parser() -> cli.Parser:
    p = cli.parser("python -m tracking.confirm", __doc__)
    add_step_arguments(p, {"top": "3", "seeds": "2", "precisions": "bf16,fp32", "threads": "1,2",
                           "final_seeds": "10", "final_precisions": "bf16,fp32",
                           "min_test_gain": str(MIN_TEST_GAIN), "test_winner": "true"})
    cli.add_experiment(p)
    return p


def add_step_arguments(p: argparse.ArgumentParser, defaults: dict[str, str], what: str = "") -> None:
    """The flags of confirm (`what`: how tune names the step), with its defaults shown; '' keeps
    those defaults."""
    p.add_argument("--config", default=DEFAULT_CONFIG, help="search file (default %(default)s)")
    p.add_argument("--storage", default="", help="Optuna storage (default: the search file's)")
    p.add_argument("--study-name", default="", help="Optuna study (default: the search file's)")
    counts = {"top": (0, "best COMPLETE trials to screen, besides the base config"),
              "seeds": (0, "screening seeds 1..N; 0: rank on the search's own seeds, train none"),
              "final_seeds": (1, "final seeds 1..N (all 60,000 images)")}
    for dest, (minimum, help_text) in counts.items():
        cli.add(p, "--" + dest.replace("_", "-"), int, minimum, unset=int(defaults[dest]),
                help=f"{what}{help_text} (default {defaults[dest]})")
    cli.add(p, "--min-test-gain", float, 0, unset=float(defaults["min_test_gain"]),
            help=f"{what}mean test hold epochs a winner other than the base must gain over the base on "
                 f"the same final seeds to be the champion (default {defaults['min_test_gain']})")
    cli.add(p, "--test-winner", bool, unset=defaults["test_winner"] == "true",
            help=f"{what}false: a trial that wins validation is not tested against the base on test and "
                 f"the base stays, one final set (default {defaults['test_winner']})")
    for dest, help_text in (("precisions", "screening precisions"), ("threads", "screening torch "
                            "thread counts"), ("final_precisions", "final precisions")):
        p.add_argument("--" + dest.replace("_", "-"), type=lambda text, d=defaults[dest]: text or d,
                       default="", help=f"{what}{help_text} (default {defaults[dest]})")
    cli.add_overrides(p, *CONFIG_FLAGS, helps={"epochs": "optim.epochs of every run (quick looks)",
                                               "train_limit": "data.train_limit of every run (quick looks)",
                                               "test_limit": "data.test_limit of every run"},
                      set_help="config override for every run (repeatable; space-separated in one argument)")


def main(argv: list[str] | None = None) -> int:
    return mlflow_run.run_entry_point(lambda _parent: command(argv))


def command(argv: list[str] | None) -> int:
    """The checks, then `run_confirm`; returns the exit status."""
    try:
        args = parser().parse_args(argv)
        args.config = args.config or DEFAULT_CONFIG  # '' is MLproject's unset
        cli.check_server()
        plan = make_plan(args)
        mnist, _ = runs.prepare(plan.spec.base)
        cli.use_experiment(args.experiment)
    except (ConfirmError, C.ConfigError, BudgetError, DataError, MlflowException,
            sqlalchemy.exc.SQLAlchemyError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"candidates: {', '.join(c.name for c in plan.candidates)}; screening "
          f"{len(plan.candidates) * len(plan.seeds) * len(plan.precisions) * len(plan.threads)} runs "
          f"on validation (threshold {plan.threshold:g}%), then {len(plan.final_seeds) * len(plan.final_precisions)} "
          "final runs" + (" (twice that if a trial wins: the base's on the same seeds)" if plan.test_winner else ""),
          flush=True)
    try:
        run_id = run_confirm(plan, mnist)
    except KeyboardInterrupt as exc:
        print("interrupted: the runs so far are KILLED or FINISHED", file=sys.stderr)
        return exit_code(exc)
    print(f"recipe: mlflow artifacts download -r {run_id} -a {RECIPE} -d .")
    print(f"parent run_id: {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
