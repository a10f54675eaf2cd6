"""``python -m tracking.search``: flags -> Options, the search, and what it prints."""

from __future__ import annotations

import argparse
import sys

import sqlalchemy.exc
from mlflow.exceptions import MlflowException

import tracking.search
from mnist_mlflow import config as C
from mnist_mlflow.data import DataError
from tracking import cli
from tracking.lifecycle import mlflow_run
from tracking.search import dashboard
from tracking.search import names as N
from tracking.search import report
from tracking.search.local import WorkersFailed
from tracking.search.plan import CONFIG_FLAGS, DEFAULT_CONFIG, Options, resolve
from tracking.search.run import SearchResult, run_search
from tracking.search.study import HEARTBEAT_S
from tracking.lifecycle.signals import exit_code


def parser() -> cli.Parser:
    p = cli.parser("python -m tracking.search", tracking.search.__doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="search file (default %(default)s)")
    add_trial_arguments(p)
    cli.add(p, "--study-trials", int, 1,
            help="shared search: run, with every worker started with the same study and "
                 "storage, until the whole study has this many finished trials")
    cli.add(p, "--heartbeat", int, 1, help=f"seconds between a running trial's heartbeats in "
            f"database storage (default {HEARTBEAT_S}); a trial silent for 3 heartbeats is failed "
            "and retried")
    p.add_argument("--storage", default="", help="sqlite:///optuna.db (the file's default), "
                                                 "journal:<file>, or any SQLAlchemy URL")
    p.add_argument("--study-name", default="", help="Optuna study; same name + storage = resume")
    cli.add(p, "--timeout", float, 0, help="the same in seconds (wins over --budget-minutes)")
    cli.add(p, "--hard-budget", bool, help="at the time budget, running trials end too, at their "
            "next epoch (STOPPED; a racing trial scores the seeds it finished), so the search ends "
            "by it (default: the file's search.hard_budget; false: a running trial finishes)")
    cli.add(p, "--workers", int, 1, help="local worker processes (default: the file's search.workers)")
    cli.add(p, "--enqueue-base", bool, help="a new study's first trial is the file's base recipe "
            "(default: the file's search.enqueue_base; false: a cold start)")
    cli.add(p, "--sampler-seed", int, 0, help="the sampler's seed (default: the file's search.sampler.seed); "
            "each trial's run seed is the config's")
    cli.add(p, "--max-params", int, 1, help="the hard parameter budget (default: the file's "
                                            "search.max_params, 8,000)")
    cli.add_overrides(p, *CONFIG_FLAGS, helps={"epochs": "optim.epochs of every trial (no longer searched)",
                                               "test_limit": "data.test_limit (reporting only)"},
                      set_help="run-config override for every trial, e.g. --set data.val_size=5000 "
                               "(repeatable; one argument may hold several, space-separated)")
    cli.add_experiment(p)
    return p


def add_trial_arguments(p: argparse.ArgumentParser, what: str = "") -> None:
    """--n-trials and --budget-minutes (`what`: how tune names the step); unset, the file's."""
    cli.add(p, "--n-trials", int, 1, help=f"{what}trials in this invocation (default: the file's)")
    cli.add(p, "--budget-minutes", float, 0, help=f"{what}minutes after which no new trial starts "
            "(default: the file's search.budget_minutes; a running trial finishes)")


def parse_args(argv: list[str] | None) -> Options:
    a = parser().parse_args(argv)
    return Options(
        config=a.config, n_trials=a.n_trials, epochs=a.epochs, storage=a.storage or None,
        study_name=a.study_name or None, timeout=a.timeout, workers=a.workers,
        sampler_seed=a.sampler_seed, train_limit=a.train_limit, test_limit=a.test_limit,
        experiment=a.experiment, max_params=a.max_params,
        overrides=tuple(o for item in a.overrides for o in item.split()),
        study_trials=a.study_trials, heartbeat=a.heartbeat, budget_minutes=a.budget_minutes,
        enqueue_base=a.enqueue_base, hard_budget=a.hard_budget)


def print_result(r: SearchResult) -> None:
    c = r.counts
    print(f"study {r.study.study_name}: {c[N.COMPLETE]} {N.COMPLETE}, {c[N.PRUNED]} {N.PRUNED}, "
          f"{c[N.STOPPED]} {N.STOPPED} (could not come near the best, or out of time), "
          f"{c[N.REJECTED]} {N.REJECTED} (over budget, no trial used), {c[N.FAIL]} {N.FAIL}"
          + (f", {c[N.SURPLUS]} {N.SURPLUS}" if c[N.SURPLUS] else ""))
    if r.best is not None:
        held = r.best.user_attrs.get(N.VAL_HOLD_EPOCH)
        print(f"best trial {r.best.number}: objective {r.best.value:.3f} "
              + (f"(validation hold completed at epoch {held}) " if held else "(never held) ")
              + f"({r.best.user_attrs[N.NUM_PARAMS]:,} parameters)")
        for k, v in r.best.params.items():
            print(f"  {k} = {v}")
        print(f"best config: mlflow artifacts download -r {r.parent_run_id} "
              f"-a {report.BEST_CONFIG} -d .")
    print(f"parent run_id: {r.parent_run_id}")


def main(argv: list[str] | None = None) -> int:
    return mlflow_run.run_entry_point(lambda _parent: command(argv))


def command(argv: list[str] | None) -> int:
    """The search and its exit status; under `mlflow run` the parent run is that command's
    (parent.open_parent)."""
    try:
        opts = parse_args(argv)
        plan = resolve(opts)  # a bad file or flag fails before any storage, run or process exists
    except (C.ConfigError, MlflowException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run_search(opts)
    except (C.ConfigError, DataError, MlflowException, sqlalchemy.exc.SQLAlchemyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkersFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print("interrupted: run the same command again to resume the study", file=sys.stderr)
        return exit_code(exc)
    print_result(result)
    print(dashboard.hint(plan.storage))  # the study's own view
    return 0
