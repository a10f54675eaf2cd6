"""A local search's K worker processes (``--workers K``): started, watched, replaced when lost.

A worker killed without a word (SIGKILL, the OOM killer) cannot end its trial. It is recovered
the way a shared search recovers a vanished worker's trial: once its heartbeat is 3 heartbeats
old, Optuna fails it and queues it again with its params and attributes (the incumbent's
too), and its MLflow run ends FAILED (study.RetryAndCloseRun). A new process then runs that
worker's remaining trials, the queued one first; a slot lost more than MAX_RETRY times is given
up, its queued trial left for the next invocation.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import signal
import socket
import sys
import time
from typing import Optional

import optuna
from optuna.trial import TrialState

from mnist_mlflow.data import Mnist
from tracking.search import names as N
from tracking.search.study import MAX_RETRY, open_storage, sampler_seed
from tracking.search.workers import WorkerJob, fail_stale_trials, optimize, worker_main


class WorkersFailed(RuntimeError):
    """Some worker processes failed; the message is one line."""


def run_jobs(jobs: list[WorkerJob], mnist: Mnist | None) -> None:
    if len(jobs) == 1:
        optimize(jobs[0], mnist)
    else:
        run_processes(jobs)


def run_processes(jobs: list[WorkerJob]) -> None:
    """Spawn (not fork: torch and MLflow hold threads), wait, and stop them all on any exit."""
    ctx = multiprocessing.get_context("spawn")
    running: dict[int, tuple[int, WorkerJob, multiprocessing.Process]] = {}
    lost: dict[int, int] = {}  # slot -> times its process was killed
    failed: list[str] = []

    def start(slot: int, job: WorkerJob) -> None:
        p = ctx.Process(target=worker_main, args=(job,), name=f"search-worker-{slot}")
        p.start()
        running[p.sentinel] = (slot, job, p)

    try:
        for slot, job in enumerate(jobs):
            start(slot, job)
        while running:
            for sentinel in multiprocessing.connection.wait(list(running)):
                slot, job, p = running.pop(sentinel)
                p.join()
                if p.exitcode == 0:
                    continue
                if p.exitcode > 0:
                    failed.append(f"{p.name} (exit {p.exitcode})")
                    continue
                lost[slot] = lost.get(slot, 0) + 1
                replacement, settled = recover(job, p, give_up=lost[slot] > MAX_RETRY)
                if replacement is not None:
                    start(slot, replacement)
                elif not settled:
                    failed.append(f"{p.name} (killed by {signal_name(-p.exitcode)})")
    finally:
        procs = [p for _, _, p in running.values()]
        for p in procs:  # on Ctrl-C/SIGTERM here: let each worker end its trial cleanly
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    if failed:
        raise WorkersFailed(f"search workers failed: {', '.join(failed)}; run the same command "
                            "again to resume the study")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def recover(job: WorkerJob, p: multiprocessing.Process,
            give_up: bool) -> tuple[Optional[WorkerJob], bool]:
    """After worker `p` died by a signal: its trial failed and queued again (by heartbeat).

    Returns the job that runs the rest of its share (None if `give_up` or none is left), and
    whether that accounts for all of it (False: a part is given up, for a later invocation)."""
    storage = open_storage(job.storage, job.heartbeat)
    study = optuna.load_study(study_name=job.study_name, storage=storage)
    name = f"{socket.gethostname()}:{p.pid}"  # workers.worker_name() in that process
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    # a queued retry carries the worker's name too: only its started, not retried trials count
    mine = [t for t in trials if t.user_attrs.get(N.WORKER_ATTR) == name and t.number not in retried]
    stranded = [t.number for t in mine if t.state == TrialState.RUNNING]
    done = sum(t.state.is_finished() and N.REJECTED_ATTR not in t.user_attrs for t in mine)
    what = f"{p.name} (pid {p.pid}) was killed by {signal_name(-p.exitcode)}"
    if job.storage.startswith("journal:"):  # study.open_storage: heartbeats in databases only
        say(f"warning: {what}; its trials {stranded} stay RUNNING: journal storage has no "
            "heartbeat to fail them (use sqlite:/// storage for --workers)")
        return None, False
    grace = 3 * job.heartbeat
    if stranded:
        say(f"warning: {what}; its trial {', '.join(map(str, stranded))} is failed and queued "
            f"again once its heartbeat is {grace} s old")
        wait_until_failed(study, stranded, deadline=time.monotonic() + grace + 2 * job.heartbeat + 10)
    left = None if job.n_trials is None else job.n_trials - done
    if left == 0:
        return None, True
    if give_up:
        return None, False
    say(f"{p.name}: a new process runs its remaining {left} trial(s)")
    job = dataclasses.replace(job, n_trials=left, sampler_seed=sampler_seed(job.sampler_seed, done, p.pid))
    return job, True


def wait_until_failed(study: optuna.Study, numbers: list[int], deadline: float) -> None:
    """Optuna's own stale-trial check (heartbeat + RetryAndCloseRun), as every worker runs it."""
    while True:
        fail_stale_trials(study)
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        if all(states[n] != TrialState.RUNNING for n in numbers) or time.monotonic() > deadline:
            return
        time.sleep(1)


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
