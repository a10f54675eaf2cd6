"""The team setup for real: PostgreSQL, the tracking server on it, three search workers, one killed.

Marked `postgres` and `slow`; skipped without PostgreSQL's server binaries, except under
`.ci/run` (MNIST_MLFLOW_REQUIRE_SERVICES=1), which installs them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from tests.services import ROOT, create_database, postgres_server, tracking_server, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

STUDY_TRIALS = 9
WORKER_ARGS = ["--study-name", "team", "--study-trials", str(STUDY_TRIALS), "--epochs", "2",
               "--train-limit", "1000", "--test-limit", "300", "--set", "data.val_size=300",
               "--set", "device=cpu", "--heartbeat", "2", "--experiment", "team", "--sampler-seed", "0",
               "--workers", "1"]  # one process a "machine": the test kills that process


def start_worker(storage: str, url: str, folder, i: int) -> subprocess.Popen:
    """`python -m tracking.search` as a worker machine would run it (one CPU thread each)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    log = open(folder / f"worker-{i}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "tracking.search", "--storage", storage,
                             "--config", str(ROOT / "experiments/search.yaml"),
                             *WORKER_ARGS], cwd=folder, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_three_workers_share_one_search_and_survive_a_killed_one(tmp_path):
    with postgres_server() as pg:
        storage = create_database(pg, "optuna")
        with tracking_server(create_database(pg, "mlflow"), tmp_path) as url:
            client = MlflowClient(url)
            started = time.monotonic()
            workers = [start_worker(storage, url, tmp_path, i) for i in range(3)]
            victim = workers[0]
            try:
                # Mid-trial: the victim's trial has its MLflow run and is training.
                name = f"{socket.gethostname()}:{victim.pid}"

                def victim_training():
                    exp = client.get_experiment_by_name("team")
                    found = exp and client.search_runs(
                        [exp.experiment_id], filter_string=f"tags.`optuna.worker` = '{name}' "
                                                           "and attributes.status = 'RUNNING'")
                    return found and found[0]

                killed_run = wait_until(victim_training, 180, "the victim's first trial", victim,
                                        tmp_path / "worker-0.log", interval=0.2)
                victim.send_signal(signal.SIGKILL)
                victim.wait(10)
                for i, w in enumerate(workers[1:], start=1):
                    assert w.wait(300) == 0, (tmp_path / f"worker-{i}.log").read_text()[-3000:]
            finally:
                for w in workers:
                    if w.poll() is None:
                        os.killpg(w.pid, signal.SIGKILL)
            wall = time.monotonic() - started

            trials = optuna.load_study(study_name="team", storage=storage).get_trials()
            exp_id = client.get_experiment_by_name("team").experiment_id
            all_runs = client.search_runs([exp_id], max_results=1000)

    states = Counter(t.state for t in trials)
    finished = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
    killed_number = int(killed_run.data.tags["optuna.trial_number"])
    killed = trials[killed_number]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_number]
    numbers = [t.number for t in trials]
    parents = [r for r in all_runs if r.data.tags.get("search_role") == "parent"]
    trial_runs = [r for r in all_runs if r.data.tags.get("search_role") == "trial"]
    runs_per_trial = Counter(int(r.data.tags["optuna.trial_number"]) for r in trial_runs)
    print(f"\nteam search: {STUDY_TRIALS} requested, {finished} finished "
          f"({states[TrialState.COMPLETE]} complete, {states[TrialState.PRUNED]} pruned or "
          f"rejected), killed trial {killed_number} -> {killed.state.name}, retried as "
          f"{[t.number for t in retries]}, {len(numbers) - len(set(numbers))} duplicate numbers, "
          f"MLflow runs per trial {sorted(Counter(runs_per_trial.values()).items())}, "
          f"{len(trials)} trials in all, {wall:.0f} s")

    assert victim.returncode == -signal.SIGKILL
    assert finished == STUDY_TRIALS
    assert killed.state == TrialState.FAIL
    (retry,) = retries
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) and retry.params == killed.params
    assert retry.user_attrs["retry_of"] == killed_number
    assert len(set(numbers)) == len(numbers) and states[TrialState.RUNNING] == 0
    assert states[TrialState.WAITING] == 0
    other_fails = [t for t in trials if t.state == TrialState.FAIL and t.number != killed_number]
    assert all(t.user_attrs.get("surplus") for t in other_fails)  # only a rare start-up race

    (parent,) = parents  # three workers, one parent run
    assert parent.info.status == "FINISHED" and parent.data.metrics["n_complete"] + \
        parent.data.metrics["n_pruned"] + parent.data.metrics["n_rejected"] == STUDY_TRIALS
    assert dict(runs_per_trial) == {t.number: 1 for t in trials}  # exactly one run per trial
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trial_runs)
    assert not [r.info.run_id for r in all_runs if r.info.status == "RUNNING"]
    lost = next(r for r in trial_runs if r.info.run_id == killed_run.info.run_id)
    assert lost.info.status == "FAILED" and lost.data.tags["trial_state"] == "FAIL"
    assert lost.data.tags["error"] == f"worker {name} lost: no heartbeat for 6 s; queued again"
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in trial_runs}
    assert by_number[retry.number].data.tags["optuna.retry_of"] == str(killed_number)
    workers_seen = {r.data.tags.get("optuna.worker") for r in trial_runs}
    assert len(workers_seen) == 3  # all three machines' workers trained
