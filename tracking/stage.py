"""Runs one stage as a tracked MLflow run: ``python -m tracking.stage experiments/stage3.yaml``.

This is what the MLproject entry points stage1, stage2 and stage3 call. The training state is
logged after every epoch (artifact checkpoint/last.pt): a run stopped by Ctrl-C or SIGTERM ends
KILLED and ``python -m tracking.stage --resume RUN_ID`` continues that same run to the result an
uninterrupted run would have had.
"""

from __future__ import annotations

import argparse
import sys

import mlflow
from mlflow.exceptions import MlflowException

from mnist_mlflow import config as C
from mnist_mlflow.data import DataError, Mnist
from mnist_mlflow.models import BudgetError, build_model
from mnist_mlflow.train import Diverged, resolve_device
from tracking import cli
from tracking.lifecycle import checkpoints, mlflow_run, runs
from tracking.lifecycle.signals import exit_code
from tracking.lifecycle.store import check_store


def checked_setup(args: argparse.Namespace) -> tuple[C.RunConfig, Mnist]:
    """Config, data, budget and store, all checked before any run exists.

    Raises SetupError with a one-line reason; the callers exit 2 on it.
    """
    try:
        resume = getattr(args, "resume", "")
        if resume:
            if cli.overrides(args):
                raise C.ConfigError("--resume continues a run with its own config: drop the overrides")
            check_store()  # before any other store call can hang in retries
            cfg = checkpoints.config_of_run(resume)
            checkpoints.load_checkpoint(resume)  # fails now (and with --check), not after loading data
        else:
            if not args.config:
                raise C.ConfigError("an experiment file is needed, e.g. experiments/stage3.yaml")
            cfg = C.load(args.config, cli.overrides(args))
            check_store()  # after the config: a bad file creates no store
        try:
            resolve_device(cfg.device)
        except RuntimeError as exc:
            raise C.ConfigError(str(exc)) from None
        mnist, _ = runs.prepare(cfg)
        build_model(cfg.model)
        if resume:  # the run's own experiment, wherever it was started (`mlflow run` picks one)
            experiment_id = mlflow.MlflowClient().get_run(resume).info.experiment_id
            mlflow.set_experiment(experiment_id=experiment_id)
        else:
            cli.use_experiment(args.experiment)
    except (C.ConfigError, BudgetError, DataError, MlflowException, checkpoints.ResumeError) as exc:
        raise SetupError(str(exc)) from exc
    return cfg, mnist


class SetupError(RuntimeError):
    """Bad input or an unusable environment, found before training."""


def interrupted_line(exc: KeyboardInterrupt) -> str:
    run_id = getattr(exc, "run_id", None)
    if run_id is None:
        return "interrupted before a run was created"
    try:
        checkpoints.check_resumable(run_id)
    except Exception as why:  # noqa: BLE001 - ResumeError, or a store gone away
        return f"interrupted: run {run_id} is KILLED; it cannot be resumed ({why})"
    return (f"interrupted: run {run_id} is KILLED; resume it with: "
            f"python -m tracking.stage --resume {run_id}")


def failed_line(exc: Exception) -> str:
    """One line for a run that ended FAILED on an error of its environment (a full disk, a store
    gone away), with the resume command when its checkpoint allows one."""
    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    run_id = getattr(exc, "run_id", None)
    if run_id is None:
        return f"error: {reason}"
    try:
        checkpoints.check_resumable(run_id)
    except Exception:  # noqa: BLE001 - ResumeError, or the store is what failed
        return f"error: {reason}; run {run_id} is FAILED"
    return f"error: {reason}; run {run_id} is FAILED; resume it with: python -m tracking.stage --resume {run_id}"


def parser() -> argparse.ArgumentParser:
    p = cli.parser("python -m tracking.stage", __doc__)
    p.add_argument("config", nargs="?", default="", help="experiment file, e.g. experiments/stage3.yaml")
    cli.add_overrides(p, *cli.OVERRIDES)
    cli.add_experiment(p)
    p.add_argument("--resume", default="", metavar="RUN_ID",
                   help="continue an interrupted run from its last checkpoint, in the same MLflow run")
    p.add_argument("--check", action="store_true",
                   help="check config, data, budget, device and store, then exit without a run")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    return mlflow_run.run_entry_point(lambda parent: run_stage(argv, parent))


def run_stage(argv: list[str] | None, parent: mlflow_run.Parent | None) -> int:
    """The stage, under `mlflow run` (`parent`) or not; returns the exit status."""
    try:
        args = parser().parse_args(argv)
        cfg, mnist = checked_setup(args)
    except (SetupError, C.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if parent is not None:
            parent.fail(str(exc))
        return 2
    except KeyboardInterrupt as exc:
        if parent is not None:  # the run `mlflow run` made is all there is: it ends KILLED
            exc.run_id = parent.run_id
        print(interrupted_line(exc), file=sys.stderr)
        return exit_code(exc)
    if args.check:
        print(f"ok: {cfg.stage}, {cfg.optim.epochs} epochs, store {mlflow.get_tracking_uri()}")
        return 0
    try:
        outcome = runs.run_training(cfg, mnist=mnist, progress=not args.no_progress, checkpoints=True,
                                    resume_run_id=args.resume or None)
    except KeyboardInterrupt as exc:  # the run is KILLED (mlflow_run keeps it so under `mlflow run`)
        print(interrupted_line(exc), file=sys.stderr)
        return exit_code(exc)  # the shell's convention: 130, 143
    except Diverged as exc:
        print(f"error: {exc}; run {getattr(exc, 'run_id', '?')} is FAILED", file=sys.stderr)
        return 1
    except (OSError, MlflowException, checkpoints.ResumeError) as exc:  # owned() ended the run FAILED
        print(failed_line(exc), file=sys.stderr)
        return 2
    print(outcome.summary(cfg), end="")
    print(f"run_id: {outcome.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
