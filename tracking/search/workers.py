"""The workers that optimize one study: here, in K spawned processes, or on several machines.

In this process, in K spawned processes (``--workers K``) or in processes on several machines
(``--study-trials N``).

A worker with a fixed share runs that many trials. A shared search's workers instead run until
the study has N finished trials (COMPLETE or PRUNED, rejected ones included): a worker starts
a trial only while finished + running + queued < N, and otherwise waits for the running ones
to end or go stale. A trial that two workers started at the same instant past N is SURPLUS
(never trained, see objective.is_surplus); a trial silent for 3 heartbeats is failed, queued
again and its run ended FAILED by the first worker that looks (study.RetryAndCloseRun).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import mlflow
import optuna
from optuna.trial import TrialState

from mnist_mlflow import threads as T
from mnist_mlflow.data import Mnist, load_mnist
from tracking.search import names as N
from tracking.search.objective import Objective, TrialContext
from tracking.search.plan import Plan
from tracking.search.sampling import make_sampler
from tracking.search.space import SearchSpec, make_pruner
from tracking.search.study import HEARTBEAT_S, open_storage, sampler_seed
from tracking.lifecycle.signals import Interrupts, exit_code

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerJob:
    """Everything one worker needs; picklable, so it crosses into a spawned process."""

    spec: SearchSpec
    storage: str
    study_name: str
    n_trials: Optional[int]  # this worker's share; None in a shared search
    timeout: Optional[float]
    sampler_seed: int
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    threads: Optional[int]  # what threads: auto means in a spawned worker (its share of the cores)
    quota: Optional[int] = None  # shared search: the study's finished trials to reach
    heartbeat: int = HEARTBEAT_S
    deadline: Optional[float] = None  # --hard-budget: the Unix time at which running trials end

    def seconds_left(self) -> Optional[float]:
        """No trial starts after this: the timeout, or less once a deadline is nearer (a
        replaced worker starts late)."""
        if self.deadline is None:
            return self.timeout
        return max(0.0, self.deadline - time.time())


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def shares(n_trials: int, workers: int) -> list[int]:
    """Fixed shares give exactly n_trials; MaxTrialsCallback, checked only after a trial ends,
    lets concurrent workers overshoot."""
    return [n_trials // workers + (1 if i < n_trials % workers else 0) for i in range(workers)]


def worker_threads(setting: T.Threads, workers: int) -> int:
    """Threads of each of K local workers: an explicit count as given; auto: the cores free
    now (sampled once, before the workers start), split between them."""
    return int(setting) if setting != T.AUTO else max(1, T.resolve(T.AUTO) // workers)


def make_jobs(plan: Plan, parent_run_id: str, experiment_id: str, n_existing: int) -> list[WorkerJob]:
    k, quota = plan.workers, plan.study_trials
    # one worker trains in this process: each trial resolves its own threads
    threads = worker_threads(plan.spec.base.threads, k) if k > 1 else None
    per_worker = [None] * k if plan.shared else shares(plan.n_trials, k)
    # Workers on other machines share seed and history: this machine and process tell them apart.
    salt = zlib.crc32(worker_name().encode()) if plan.shared else 0
    deadline = time.time() + plan.timeout if plan.hard_budget else None
    return [WorkerJob(plan.spec, plan.storage, plan.study_name, n, plan.timeout,
                      sampler_seed(plan.sampler_seed, n_existing, i, salt), parent_run_id,
                      experiment_id, mlflow.get_tracking_uri(), threads, quota, plan.heartbeat,
                      deadline)
            for i, n in enumerate(per_worker) if n is None or n > 0]


def optimize(job: WorkerJob, mnist: Mnist | None = None) -> None:
    """One worker's loop; a trial that raises is FAIL and the loop goes on (catch=Exception)."""
    study = optuna.load_study(study_name=job.study_name,
                              storage=open_storage(job.storage, job.heartbeat),
                              sampler=make_sampler(job.spec.settings, job.sampler_seed),
                              pruner=make_pruner(job.spec.settings.pruner))
    ctx = TrialContext(job.spec, job.study_name, job.parent_run_id, job.experiment_id,
                       mnist or load_mnist(job.spec.base.data.data_dir), worker_name(), job.quota,
                       job.deadline)
    if job.quota is not None:
        optimize_to_quota(study, Objective(ctx), job.quota, job.seconds_left(), poll_s=min(5, job.heartbeat))
    else:
        study.optimize(Objective(ctx), timeout=job.seconds_left(), catch=(Exception,),
                       gc_after_trial=True, callbacks=[TrainedTrials(job.n_trials)])


class TrainedTrials:
    """Stops a worker after `n` trials that were not rejected: an over-budget combination is
    refused in milliseconds and does not use up a trial. A space almost wholly over the budget
    still ends, after max(MIN_REJECTS, REJECTS_PER_TRIAL * n) rejections."""

    REJECTS_PER_TRIAL, MIN_REJECTS = 5, 10

    def __init__(self, n: Optional[int]):
        self.n, self.trained, self.rejected = n, 0, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if N.REJECTED_ATTR in trial.user_attrs:
            self.rejected += 1
        else:
            self.trained += 1
        if self.n is None:
            return
        too_many = self.rejected >= max(self.MIN_REJECTS, self.REJECTS_PER_TRIAL * self.n)
        if too_many:
            log.warning("%d trials were over the parameter budget: stopping", self.rejected)
        if too_many or self.trained >= self.n:
            study.stop()


def die_with_parent() -> None:
    """Linux: SIGTERM this worker when the search process dies, SIGKILL included (prctl's
    PR_SET_PDEATHSIG), so that no orphan trains on to the end of the budget; the SIGTERM ends
    its trial as an interrupt does. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def worker_main(job: WorkerJob) -> None:
    """Entry point of a spawned worker process."""
    die_with_parent()
    os.environ.pop("MLFLOW_RUN_ID", None)  # never adopt the parent run as our own
    T.pin_auto(job.threads)  # K workers share the free cores instead of fighting for them
    mlflow.set_tracking_uri(job.tracking_uri)
    mlflow.set_experiment(experiment_id=job.experiment_id)
    try:
        # one request to the end (the trial's runs use it): the search's SIGTERM after a Ctrl-C
        # that reached this process too must not cut the trial's end short
        with Interrupts().installed():
            optimize(job)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the trial is recorded; no traceback
        sys.exit(exit_code(exc))


# ---------------------------------------------------------------- a shared search's quota

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
                     if not t.user_attrs.get(N.SURPLUS_ATTR))
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
