"""One search shared by workers on several machines: ``--study-trials N``.

Every worker runs the same command against one RDB storage (PostgreSQL for a team) and one
tracking server. The workers agree on three things through the study itself:

- **one parent run**: the worker whose `create_study` succeeded (the database lets exactly one
  win) creates the parent MLflow run and stores its id in the study's user attributes; the
  others wait for that id and nest their trials under it, as do workers that join later;
- **N finished trials** (COMPLETE or PRUNED, rejected ones included): a worker starts a trial
  only while finished + running + queued < N, and otherwise waits for the running ones to end
  or go stale. A trial that two workers started at the same instant past N is SURPLUS (never
  trained, FAIL in Optuna, see search_objective.is_surplus);
- **dead workers**: a trial silent for 3 heartbeats is failed, queued again and its run ended
  FAILED by the first worker that looks (search_study.RetryAndCloseRun).

The parent run is ended (with the summary) by a worker that leaves when no trial is running;
while other workers are still at it, it stays RUNNING.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections import Counter
from typing import Callable, Optional

import mlflow
import optuna
from optuna.trial import TrialState

from mnist_mlflow import config as C

log = logging.getLogger(__name__)
PARENT_ATTR, EXPERIMENT_ATTR = "mlflow_parent_run_id", "mlflow_experiment_id"
JOIN_WAIT_S = 60  # how long a joining worker waits for the creator to record the parent run


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def join_parent(study: optuna.Study, storage: optuna.storages.BaseStorage, created: bool,
                create_parent: Callable[[], tuple[str, str]]) -> tuple[str, str]:
    """(parent run id, experiment id) of the study's search; the creator makes the run."""
    if created:
        try:
            run_id, experiment_id = create_parent()
            study.set_user_attr(EXPERIMENT_ATTR, experiment_id)
            study.set_user_attr(PARENT_ATTR, run_id)  # last: joiners wait for this one
        except BaseException:
            # Without a parent no worker could join: give the name back for the next try.
            optuna.delete_study(study_name=study.study_name, storage=storage)
            raise
        return run_id, experiment_id
    deadline = time.monotonic() + JOIN_WAIT_S
    while True:
        attrs = study.user_attrs  # read from the storage each time
        if PARENT_ATTR in attrs:
            return attrs[PARENT_ATTR], attrs[EXPERIMENT_ATTR]
        if time.monotonic() > deadline:
            raise C.ConfigError(
                f"study {study.study_name!r} has no shared parent run after {JOIN_WAIT_S} s: it "
                "was started without --study-trials, or its first worker failed; use another "
                "--study-name")
        time.sleep(0.5)


def check_parent(run_id: str) -> None:
    """The parent must be on this worker's tracking server: same MLFLOW_TRACKING_URI everywhere."""
    try:
        mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise C.ConfigError(
            f"the study's parent run {run_id} is not on {mlflow.get_tracking_uri()}: point "
            "MLFLOW_TRACKING_URI at the tracking server the first worker used") from exc


def tally(study: optuna.Study) -> Counter:
    return Counter(t.state for t in study.get_trials(deepcopy=False))


def fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def optimize_to_quota(study: optuna.Study, objective: Callable, quota: int,
                      timeout: Optional[float], poll_s: float) -> None:
    """Runs trials until the study has `quota` finished ones (see the module docstring).

    Gives up after `quota` failed trials (a broken setup would otherwise loop forever).
    """
    start = time.monotonic()
    while True:
        fail_stale_trials(study)  # a dead worker's trial turns FAIL and is queued again
        n = tally(study)
        finished = n[TrialState.COMPLETE] + n[TrialState.PRUNED]
        if finished >= quota:
            return
        failed = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                     if not t.user_attrs.get("surplus"))
        if failed >= quota:
            raise RuntimeError(f"study {study.study_name!r}: {failed} trials failed, as many as "
                               f"the {quota} requested; see their runs' `error` tags")
        if timeout is not None and time.monotonic() - start >= timeout:
            return
        if finished + n[TrialState.RUNNING] + n[TrialState.WAITING] >= quota and not n[TrialState.WAITING]:
            time.sleep(poll_s)  # the last trials run elsewhere: they end, or go stale and return
            continue
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            # Our heartbeat was late (a stalled machine): another worker already failed and
            # re-queued this trial. Its retry counts instead; this worker goes on.
            log.warning("a trial of this worker was failed by another one: %s", exc)


def end_parent(study: optuna.Study, run_id: str, status: str,
               summarize: Callable[[optuna.Study], None]) -> bool:
    """Logs the summary; ends the parent with `status` unless trials still run elsewhere.

    Returns whether it ended the run.
    """
    summarize(study)
    fail_stale_trials(study)  # a dead worker's trial does not keep the parent open
    if tally(study)[TrialState.RUNNING]:
        return False
    mlflow.MlflowClient().set_terminated(run_id, status)
    return True
