"""From nothing to ``models:/mnist-8k@champion``: search -> confirm -> promote, one tracked chain.

    python -m tracking.tune [--n-trials 30] [--study-name mnist-search] ...

In the way of MLflow's multistep workflow example: the tune run is the parent; each step is
its own child run, created here and handed to the step's process through ``MLFLOW_RUN_ID``
(as `mlflow run` hands a run to its command), so the step logs into it:

1. ``python -m tracking.search``: the Optuna study; its trials nest under the search run.
2. ``python -m tracking.confirm``: ranks the study's best trials and the base config on
   validation (by default on the seeds the search raced them on: ``--seeds 0``, nothing
   retrained), runs the winner's final seeds on all 60,000 images (a trial that won: the base's
   too, and it becomes the champion only if it gains ``--min-test-gain`` epochs on test) and
   logs recipe.yaml; its runs nest under the confirm run.
3. ``python -m tracking.promote --parent-run-id <confirm run>``: registers the champion's first
   final run that held the target. Promote opens no run of its own: its output and exit code are
   logged on the promote run here.

Time: the chain fits ``--total-minutes`` (150): before anything starts, confirm's runs are timed
on this machine (tracking/tune_time.py) and the search gets what they leave, at most its own
budget, ending its running trials at that budget (``--hard-budget``). Where a winner's final
runs and the base's would leave the search too little, confirm gets ``--test-winner false``.

The parent records each step's run id (tags ``step.<name>.run_id``), the study and storage, and
the promoted version. A step that fails ends the chain: its run and the parent are FAILED, later
steps never start. Exit codes: 0 promoted; 1 a step failed; 2 bad input (nothing created);
130 or 143 interrupted by Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnist_mlflow import config as C
from mnist_mlflow.data import DataError, load_mnist
from tracking import cli, confirm, promote, tune_time
from tracking.lifecycle import mlflow_run, runs
from tracking.lifecycle.signals import exit_code
from tracking.promotion.candidates import CHAMPION_TAG
from tracking.search import cli as search_cli
from tracking.search import names as N
from tracking.search.plan import DEFAULT_CONFIG
from tracking.search.space import SearchSpec, load_search
from tracking.search.study import redact

OUTPUT = "output.txt"  # each step's stdout and stderr, on its run
TOTAL_MINUTES = 150.0  # the chain on a 2-core CPU: search, then confirm, then promote
INTERRUPT_GRACE_S = 60  # for a step to end its runs after Ctrl-C, before it is terminated


class StepFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]


# ---------------------------------------------------------------- the steps' commands

# Tune's flags that each step takes as its own, by argparse dest; the step's parser spells them.
SEARCH_FLAGS = ("n_trials", "budget_minutes", *confirm.CONFIG_FLAGS, "overrides")
CONFIRM_FLAGS = ("top", "seeds", "precisions", "threads", "final_seeds", "final_precisions",
                 "min_test_gain", *confirm.CONFIG_FLAGS, "overrides")
PROMOTE_FLAGS = ("model_name", "target", "hold")


def step_argv(module: str, step_parser: argparse.ArgumentParser, values: dict[str, Any]) -> list[str]:
    """``python -m module`` with the step's own flag for each value that is set ('' is MLproject's
    unset); a list is a repeated flag (``--set``)."""
    flags = {a.dest: max(a.option_strings, key=len) for a in step_parser._actions if a.option_strings}
    argv = [sys.executable, "-m", module]
    for dest, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            if item is not None and str(item).strip():
                argv += [flags[dest], str(item)]
    return argv


def given(args: argparse.Namespace, dests: tuple[str, ...]) -> dict[str, Any]:
    return {dest: getattr(args, dest) for dest in dests}


def search_step(args: argparse.Namespace, storage: str, study: str, minutes: float) -> Step:
    """The search ends by its share of the chain's time: no trial starts or runs past it."""
    return Step("search", step_argv("tracking.search", search_cli.parser(), {
        "config": args.config, "storage": storage, "study_name": study, **given(args, SEARCH_FLAGS),
        "budget_minutes": f"{minutes:.1f}", "hard_budget": "true"}))


def confirm_step(args: argparse.Namespace, storage: str, study: str, test_winner: bool = True) -> Step:
    """`test_winner` False: the chain has no time for the base's final runs beside a winner's."""
    return Step("confirm", step_argv("tracking.confirm", confirm.parser(), {
        "config": args.config, "storage": storage, "study_name": study, **given(args, CONFIRM_FLAGS),
        "test_winner": str(test_winner).lower()}))


def promote_step(args: argparse.Namespace, confirm_run_id: str) -> Step:
    return Step("promote", step_argv("tracking.promote", promote.parser(), {
        **given(args, PROMOTE_FLAGS), "parent_run_id": confirm_run_id}))


# ---------------------------------------------------------------- running one step

def run_step(step: Step, parent_id: str, experiment_id: str) -> str:
    """Runs `step` in its own child run of `parent_id`; returns the child's id."""
    client = MlflowClient()
    child = client.create_run(experiment_id, run_name=step.name,
                              tags={N.PARENT_TAG: parent_id, "tune_step": step.name})
    run_id = child.info.run_id
    client.set_tag(parent_id, f"step.{step.name}.run_id", run_id)
    env = {**os.environ, "MLFLOW_RUN_ID": run_id, "MLFLOW_EXPERIMENT_ID": experiment_id,
           "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "PYTHONUNBUFFERED": "1"}
    print(f"== {step.name} (run {run_id}): {' '.join(step.argv[1:])}", flush=True)
    lines: list[str] = []
    proc = subprocess.Popen(step.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        rc = proc.wait()
    except KeyboardInterrupt as exc:
        rc = stop(proc, sigterm=getattr(exc, "signum", None) == signal.SIGTERM)
        finish(client, run_id, rc, lines)
        raise
    finish(client, run_id, rc, lines)
    if rc != 0:
        errors = [ln.strip() for ln in lines if ln.startswith("error:")]
        reason = errors[-1].removeprefix("error: ") if errors else (lines[-1].strip() if lines else "no output")
        raise StepFailed(f"step {step.name} failed (exit {rc}, run {run_id}): {reason}")
    return run_id


def stop(proc: subprocess.Popen, sigterm: bool) -> int:
    """Ctrl-C reached the step too (same process group): let it end its runs; a SIGTERM sent
    to us alone is passed on."""
    try:
        if sigterm:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(INTERRUPT_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            return proc.wait(INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def finish(client: MlflowClient, run_id: str, rc: int, lines: list[str]) -> None:
    """The step's output and exit code on its run; a run the step left open is ended here."""
    client.log_text(run_id, "".join(lines), OUTPUT)
    client.set_tag(run_id, "exit_code", rc)
    if client.get_run(run_id).info.status == "RUNNING":
        status = "FINISHED" if rc == 0 else "KILLED" if rc in (130, -2, -15, 143) else "FAILED"
        client.set_terminated(run_id, status)


# ---------------------------------------------------------------- the chain

def run_tune(args: argparse.Namespace, storage: str, study: str,
             chain: tune_time.ChainBudget) -> tuple[str, str]:
    """The chain under one parent run; returns (parent run id, promoted version)."""
    start = time.monotonic()
    with runs.tracked_run(run_name="tune", tags={"stage": "tune", N.STUDY_TAG: study,
                                                 N.STORAGE_TAG: redact(storage)}) as parent:
        parent_id, experiment_id = parent.info.run_id, parent.info.experiment_id
        mlflow.log_params({"tune.config": args.config, "tune.study_name": study,
                           "tune.storage": redact(storage), "tune.model_name": args.model_name,
                           **chain.params()})
        run_step(search_step(args, storage, study, chain.search), parent_id, experiment_id)
        confirm_id = run_step(confirm_step(args, storage, study, chain.test_winner), parent_id, experiment_id)
        promote_id = run_step(promote_step(args, confirm_id), parent_id, experiment_id)
        version = MlflowClient().get_model_version_by_alias(args.model_name, promote.ALIAS)
        champion = f"models:/{args.model_name}@{promote.ALIAS}"
        chosen = MlflowClient().get_run(confirm_id).data.tags.get(CHAMPION_TAG, "")
        info = {"model_name": args.model_name, "model_version": version.version, "confirm_champion": chosen,
                "model_uri": champion, "model_run_id": version.run_id}
        mlflow.set_tags(info)
        for key, value in info.items():
            MlflowClient().set_tag(promote_id, key, value)
        mlflow.log_metric("minutes", (time.monotonic() - start) / 60)  # against tune.total_minutes
    return parent_id, str(version.version)


def check(args: argparse.Namespace) -> tuple[SearchSpec, str, str]:
    """Every check that needs no run; returns (search file, storage, study name)."""
    spec = load_search(args.config, cli.overrides(args, confirm.CONFIG_FLAGS))
    for name in ("precisions", "final_precisions"):
        cli.choice_list(name.replace("_", "-"), getattr(args, name), confirm.PRECISIONS)
    cli.int_list("threads", args.threads, 1)
    confirm.check_min_test_gain(args.min_test_gain)
    crit = promote.Criteria.of(target=args.target, hold=args.hold)
    promote.check_arguments(args.model_name, crit.target, crit.hold)
    if args.seeds == 0 and not spec.settings.enqueue_base:
        raise confirm.ConfirmError("--seeds 0 ranks the candidates on the search's own runs and needs "
                                   "the base among them, but search.enqueue_base is false: screen with "
                                   "--seeds 2, or enqueue the base")
    return spec, args.storage or spec.settings.storage, args.study_name or spec.settings.study_name


def parser() -> cli.Parser:
    p = cli.parser("python -m tracking.tune", __doc__)
    # Sized for 2 CPU cores: 2 candidates and the base ranked on the seeds the search raced them
    # on (validation, nothing retrained) and 10 final seeds on test, fp32 (README: add bf16 where
    # native); the search gets what they leave of --total-minutes, at most its hour.
    confirm.add_step_arguments(p, {"top": "2", "seeds": "0", "precisions": "fp32",
                                   "threads": "2", "final_seeds": "10",
                                   "final_precisions": "fp32",
                                   "min_test_gain": str(confirm.MIN_TEST_GAIN), "test_winner": "true"},
                             what="confirm: ")
    search_cli.add_trial_arguments(p, what="search: ")
    cli.add(p, "--total-minutes", float, 1, unset=TOTAL_MINUTES,
            help=f"the whole chain's time (default {TOTAL_MINUTES:g}): confirm's runs are timed here "
                 "first and the search gets the rest, at most --budget-minutes")
    cli.add(p, "--probe-batches", int, 1, unset=tune_time.PROBE_BATCHES,
            help=f"training batches an epoch of each timing probe (default {tune_time.PROBE_BATCHES}); "
                 "fewer: a quicker, rougher estimate")
    promote.add_step_arguments(p, what="promote: ")  # only the promote step has a target
    cli.add_experiment(p)
    return p


def command(argv: list[str] | None) -> int:
    """The checks, then the chain; returns the exit status."""
    try:
        args = parser().parse_args(argv)
        args.config = args.config or DEFAULT_CONFIG  # '' is MLproject's unset
        args.model_name = args.model_name or promote.DEFAULT_MODEL_NAME
        cli.check_server()
        spec, storage, study = check(args)
        chain = tune_time.plan_chain(spec, args, load_mnist(spec.base.data.data_dir), args.probe_batches)
        cli.use_experiment(args.experiment)
    except (confirm.ConfirmError, C.ConfigError, promote.PromotionError, MlflowException, DataError,
            tune_time.ChainTooLong) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print(chain.line(), flush=True)
    try:
        parent_id, version = run_tune(args, storage, study, chain)
    except KeyboardInterrupt as exc:
        print("interrupted: the chain's runs are KILLED", file=sys.stderr)
        return exit_code(exc)
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"tune run {parent_id}: models:/{args.model_name}@{promote.ALIAS} is version {version}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return mlflow_run.run_entry_point(lambda _parent: command(argv))


if __name__ == "__main__":
    sys.exit(main())
