"""Runs one stage as a tracked MLflow run: ``python -m tracking.stage experiments/stage3.yaml``.

This is what the MLproject entry points stage1, stage2 and stage3 call. The training state is
logged after every epoch (artifact checkpoint/last.pt): a run stopped by Ctrl-C or SIGTERM ends
KILLED and ``python -m tracking.stage --resume RUN_ID`` continues that same run to the result an
uninterrupted run would have had.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

import mlflow
from mlflow.exceptions import MlflowException

from mnist_mlflow import config as C
from mnist_mlflow.data import DataError, Mnist
from mnist_mlflow.models import BudgetError, build_model
from tracking import runs

DEFAULT_EXPERIMENT = "mnist-mlflow"


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Shortcuts for the most used overrides; empty strings (MLproject defaults) mean 'unset'."""
    p.add_argument("--epochs", default="", help="optim.epochs")
    p.add_argument("--seed", default="", help="seed")
    p.add_argument("--train-limit", default="", help="data.train_limit: train on the first N images")
    p.add_argument("--test-limit", default="", help="data.test_limit")
    p.add_argument("--data-dir", default="", help="folder of MNIST IDX files instead of the cached wheel")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config override, e.g. --set schedule.name=step (repeatable; a single "
                        "argument may hold several, space-separated)")
    p.add_argument("--experiment", default="", help=f"MLflow experiment (default {DEFAULT_EXPERIMENT}, "
                                                    "or the one `mlflow run` set)")


def overrides_from(args: argparse.Namespace) -> list[str]:
    out = []
    for key, name in (("optim.epochs", "epochs"), ("seed", "seed"), ("data.train_limit", "train_limit"),
                      ("data.test_limit", "test_limit")):
        if getattr(args, name) not in ("", None):
            out.append(f"{key}={getattr(args, name)}")
    if args.data_dir:
        out.append(f"data.data_dir={args.data_dir}")
    for item in args.overrides:
        out.extend(item.split())
    return out


def check_server(uri: str, timeout: float = 5.0) -> None:
    """An HTTP tracking server must answer /health now: MLflow's own client would retry for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MlflowException(f"tracking server {uri} cannot be reached ({reason}); start it or set "
                              "MLFLOW_TRACKING_URI to a reachable store, e.g. sqlite:///mlflow.db") from exc


def use_experiment(name: str) -> str:
    """Inside `mlflow run` the experiment is already chosen; otherwise ours, or the one named.

    This is also the first contact with the tracking store: an unreachable one fails here.
    Returns the experiment's id.
    """
    check_server(mlflow.get_tracking_uri())
    if not name and "MLFLOW_EXPERIMENT_ID" in os.environ:
        return mlflow.set_experiment(experiment_id=os.environ["MLFLOW_EXPERIMENT_ID"]).experiment_id
    experiment = mlflow.set_experiment(name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                                       or DEFAULT_EXPERIMENT)
    # MLflow 3.17 leaves the experiment inactive when another process created it at the same
    # moment (several workers starting at once): activate it by id.
    return mlflow.set_experiment(experiment_id=experiment.experiment_id).experiment_id


def checked_setup(args: argparse.Namespace) -> tuple[C.RunConfig, Mnist]:
    """Config, data, budget and store, all checked before any run exists.

    Raises SetupError with a one-line reason; the callers exit 2 on it.
    """
    try:
        check_server(mlflow.get_tracking_uri())  # before any other store call can hang in retries
        if getattr(args, "resume", ""):
            if overrides_from(args):
                raise C.ConfigError("--resume continues a run with its own config: drop the overrides")
            cfg = runs.config_of_run(args.resume)
            runs.check_resumable(args.resume)  # fails now, not after loading data
        else:
            if not args.config:
                raise C.ConfigError("an experiment file is needed, e.g. experiments/stage3.yaml")
            cfg = C.load(args.config, overrides_from(args))
        mnist, _ = runs.prepare(cfg)
        build_model(cfg.model)
        use_experiment(args.experiment)
    except (C.ConfigError, BudgetError, DataError, MlflowException, runs.ResumeError) as exc:
        raise SetupError(str(exc)) from exc
    return cfg, mnist


class SetupError(RuntimeError):
    """Bad input or an unusable environment, found before training."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tracking.stage", description=__doc__)
    p.add_argument("config", nargs="?", default="", help="experiment file, e.g. experiments/stage3.yaml")
    add_common_arguments(p)
    p.add_argument("--resume", default="", metavar="RUN_ID",
                   help="continue an interrupted run from its last checkpoint, in the same MLflow run")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg, mnist = checked_setup(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with runs.sigterm_as_interrupt():
        outcome = runs.run_training(cfg, mnist=mnist, progress=not args.no_progress, checkpoints=True,
                                    resume_run_id=args.resume or None)
    print(runs.summary_text(cfg, outcome.hold, runs.count_params(outcome.result.model),
                            outcome.result.history), end="")
    print(f"run_id: {outcome.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
