"""Promotes the first run that held the target to the Model Registry as ``<name>@champion``.

    python -m tracking.promote [--model-name mnist-8k] [--stage-config experiments/stage3.yaml]
                               [--target PERCENT] [--hold EPOCHS] [--from-experiment NAME]
                               [--parent-run-id ID] [--dry-run]

"First" is by start time over FINISHED runs (stage runs and search trials alike) that
have a logged model named "model" and a ``test_accuracy`` history; with ``--parent-run-id``
only the children of that run (e.g. tracking.confirm's final runs; of its champion, when its
tag ``champion`` names one). Only runs this project
logged (tag made_by=mnist-mlflow) whose logged model is verifiably a TinyNet of their
`model.*` config count: it is loaded without executing anything from the store
(tracking/lifecycle/safe_model.py); any other run that held the target is skipped with one line on
stderr. Before anything is registered its parameter count is checked against the budget and
its test accuracy recomputed; a disagreement with the run's last logged value refuses the
promotion. A registered model of that name that this project did not create is refused. Target, hold and budget are the experiment file's (`--stage-config`:
target.accuracy, target.hold, model.max_params); --target and --hold override the first two.

Exit codes: 0 promoted, already promoted or dry run; 1 no qualifying run;
2 bad arguments or an unreachable store; 3 refused (logged accuracy disagrees).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnist_mlflow import config as C
from mnist_mlflow.data import DataError, Mnist, load_mnist
from mnist_mlflow.evaluation import evaluate
from tracking import cli
from tracking.lifecycle import mlflow_run
from tracking.promotion.candidates import (CHAMPION_TAG, METRIC, AccuracyMismatch, Candidate, Criteria,
                                           NoCandidate, PromotionError, no_candidate_message,
                                           param_int, select_run)
from tracking.promotion.registry import check_ours, complete, find_version, register

DEFAULT_MODEL_NAME = "mnist-8k"
ALIAS = "champion"
TOLERANCE = 0.05  # percentage points between the logged and the recomputed accuracy


@dataclass(frozen=True)
class PromotionResult:
    model_name: str
    version: Optional[str]  # None only for a dry run that would register a new version
    run_id: str
    model_uri: str
    created: bool  # False: the run was already registered (or dry run)
    dry_run: bool
    num_params: int
    hold_epochs: int
    best_test_accuracy: float
    held_test_accuracy: float
    logged_test_accuracy: float  # the run's last logged value
    verified_test_accuracy: Optional[float]  # None when an existing version was reused

    def describe(self) -> str:
        what = (f"would register run {self.run_id}" if self.dry_run and self.version is None else
                f"run {self.run_id} is {self.model_name} version {self.version}")
        verb = "promoted" if self.created else ("dry run" if self.dry_run else "already promoted")
        checked = ("" if self.verified_test_accuracy is None else
                   f", re-evaluated {self.verified_test_accuracy:.2f}%")
        return (f"{verb}: {what} (@{ALIAS})\n"
                f"  longest hold {self.hold_epochs} epochs, held {self.held_test_accuracy:.2f}%, "
                f"best {self.best_test_accuracy:.2f}%, last logged {self.logged_test_accuracy:.2f}%"
                f"{checked}, {self.num_params:,} parameters\n"
                f"  load with: models:/{self.model_name}@{ALIAS}")


# ---------------------------------------------------------------- arguments

def check_arguments(model_name: str, target: float, hold: int,
                    parent_run_id: Optional[str] = None) -> None:
    if not model_name.strip() or any(c in model_name for c in "'\"%/"):
        raise PromotionError(f"--model-name {model_name!r} is not allowed: a non-empty name "
                             "without quotes, % or /")
    if not (isinstance(target, (int, float)) and 0 < target <= 100):
        raise PromotionError(f"--target {target!r} is not allowed: 0 < target <= 100 (percent)")
    if not (isinstance(hold, int) and hold > 0):
        raise PromotionError(f"--hold {hold!r} is not allowed: a positive number of epochs")
    if parent_run_id and not re.fullmatch(r"[0-9a-zA-Z_-]+", parent_run_id):
        raise PromotionError(f"--parent-run-id {parent_run_id!r} is not allowed: a run id")


def experiment_ids(client: MlflowClient, name: Optional[str]) -> list[str]:
    if name:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise PromotionError(f"--from-experiment {name!r} does not exist; experiments: {known}")
        return [exp.experiment_id]
    return [e.experiment_id for e in client.search_experiments()]


# ---------------------------------------------------------------- verification

def verify_accuracy(cand: Candidate, mnist: Optional[Mnist]) -> float:
    """Recomputes test accuracy on the same test images the run used (its data.test_limit)."""
    if mnist is None:
        data_dir = cand.run.data.params.get("data.data_dir")
        mnist = load_mnist(None if data_dir in (None, "", "None") else data_dir)
    limit = param_int(cand.run, "data.test_limit")
    x, y = mnist.test_x[:limit], mnist.test_y[:limit]
    _, acc = evaluate(cand.model, torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y))
    if not math.isclose(acc, cand.last_accuracy, abs_tol=TOLERANCE):
        raise AccuracyMismatch(
            f"refusing to promote run {cand.run_id}: its logged model scores {acc:.2f}% on the "
            f"{len(y):,} test images, but the run's last logged {METRIC} is "
            f"{cand.last_accuracy:.2f}% (allowed difference {TOLERANCE} points); the metric or "
            "the model was changed after training")
    return acc


def result_of(name: str, cand: Candidate, version: Optional[str | int], created: bool, dry_run: bool,
              verified: Optional[float]) -> PromotionResult:
    h = cand.hold
    version = None if version is None else str(version)  # the store answers int or str
    return PromotionResult(name, version, cand.run_id, cand.model_uri, created, dry_run,
                           cand.num_params, h.hold_epochs, h.best_accuracy, h.held_accuracy,
                           cand.last_accuracy, verified)


def promote(model_name: str = DEFAULT_MODEL_NAME, target: Optional[float] = None,
            hold: Optional[int] = None, experiment: Optional[str] = None, dry_run: bool = False, *,
            alias: str = ALIAS, mnist: Optional[Mnist] = None, parent_run_id: Optional[str] = None,
            config: str | Path = cli.STAGE3) -> PromotionResult:
    """Registers the first qualifying run under `model_name` and points `alias` at it.

    Uses the current tracking URI. Raises NoCandidate, AccuracyMismatch, PromotionError or
    ConfigError (the experiment file).
    """
    crit = Criteria.of(config, target, hold)
    check_arguments(model_name, crit.target, crit.hold, parent_run_id)
    client = MlflowClient()
    check_ours(client, model_name)  # before the scan: another team's model is refused at once
    champion = champion_of(client, parent_run_id) if parent_run_id else None
    cand, rejected = select_run(client, experiment_ids(client, experiment), crit, parent_run_id,
                                on_skip=lambda line: print(line, file=sys.stderr, flush=True),
                                candidate=champion)
    if cand is None:
        scope = f"experiment {experiment!r}" if experiment else "any experiment"
        if parent_run_id:
            scope += f" under run {parent_run_id}" + (f" (its champion {champion})" if champion else "")
        raise NoCandidate(no_candidate_message(rejected, crit, scope))
    existing = find_version(client, model_name, cand.run_id)
    # An existing version was verified when it was registered; a new one must be now.
    verified = None if existing else verify_accuracy(cand, mnist)
    if dry_run:
        return result_of(model_name, cand, existing and existing.version, False, True, verified)
    existing = find_version(client, model_name, cand.run_id)  # another promoter may have won
    if existing:  # its tags too: a promoter killed before writing them left it without
        complete(client, model_name, existing, cand, alias)
        return result_of(model_name, cand, existing.version, False, False, verified)
    version, created = register(client, model_name, cand, alias, crit.max_params)
    return result_of(model_name, cand, version.version, created, False, verified)


def champion_of(client: MlflowClient, parent_run_id: str) -> Optional[str]:
    """The candidate a confirm parent named its champion (tag), or None; an unknown run id
    fails here (exit 2), not as "no candidate"."""
    name = client.get_run(parent_run_id).data.tags.get(CHAMPION_TAG)
    if name is not None and not re.fullmatch(r"base|trial-\d+", name):
        raise PromotionError(f"run {parent_run_id}'s tag {CHAMPION_TAG}={name[:40]!r} is not allowed: "
                             "'base' or 'trial-<number>'")
    return name


# ---------------------------------------------------------------- CLI

def parser() -> cli.Parser:
    p = cli.parser("python -m tracking.promote", __doc__)
    add_step_arguments(p)
    # --stage-config and --from-experiment: elsewhere --config is a search file and
    # --experiment where runs go; here they are the criteria's file and a filter
    p.add_argument("--stage-config", dest="config", default=str(cli.STAGE3),
                   help="experiment file whose target and budget apply (default %(default)s)")
    p.add_argument("--from-experiment", dest="experiment", default="",
                   help="only runs of this experiment (default: all experiments)")
    p.add_argument("--parent-run-id", default="", help="only the child runs of this run "
                                                       "(e.g. tracking.confirm's parent)")
    # A value is accepted too so that the MLproject entry point can pass dry_run=false.
    p.add_argument("--dry-run", nargs="?", const="true", default="false", type=cli.typed("dry-run", bool),
                   help="report what would be promoted, register nothing")
    return p


def add_step_arguments(p: argparse.ArgumentParser, what: str = "") -> None:
    """The model's name and what qualifies (`what`: how tune names the step)."""
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help=f"{what}registered model "
                                                                    "(default %(default)s)")
    cli.add(p, "--target", float, help=f"{what}test accuracy in percent (default: the stage file's "
                                       "target.accuracy; a quick look on tiny data needs a lower one)")
    cli.add(p, "--hold", int, help=f"{what}consecutive epochs at or above target (default: target.hold)")


def main(argv: list[str] | None = None) -> int:
    return mlflow_run.run_entry_point(lambda _parent: command(argv))


def command(argv: list[str] | None) -> int:
    """Promotion from the command line; returns the exit status. Under `mlflow run` it logs
    into no run: that run ends with the exit status (mlflow_run.Parent.settle)."""
    try:
        args = parser().parse_args(argv)
        cli.check_server()
        result = promote(args.model_name, args.target, args.hold, args.experiment or None,
                         bool(args.dry_run), parent_run_id=args.parent_run_id or None,
                         config=args.config)
    except PromotionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (C.ConfigError, MlflowException, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
