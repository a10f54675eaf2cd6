"""A run's training state after every epoch, and resuming an interrupted run from it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import torch
import yaml

from mnist_mlflow import config as C
from mnist_mlflow import threads as T
from mnist_mlflow.train import EpochMetrics
from tracking.lifecycle import liveness
from tracking.lifecycle.run_logging import log_epoch

CHECKPOINT_DIR, CHECKPOINT_FILE = "checkpoint", "last.pt"  # replaced after every epoch
THREADS_PARAM = "threads_resolved"  # the torch threads a run trained with (its `threads` may say auto)
ADDED_CONFIG_KEYS = {"threads": "auto"}  # config keys newer than some logged runs: their default


class ResumeError(RuntimeError):
    """A run cannot be resumed: unknown, finished, or without a checkpoint."""


def log_checkpoint(state: dict) -> None:
    """The latest epoch's full training state, so an interrupted run can be resumed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT_FILE
        torch.save(state, path)
        mlflow.log_artifact(str(path), CHECKPOINT_DIR)


def config_of_run(run_id: str) -> C.RunConfig:
    """The config a run logged, rebuilt from its params (values come back as strings)."""
    params = mlflow.MlflowClient().get_run(run_id).data.params
    keys = C.flatten(C.RunConfig())
    params = {**ADDED_CONFIG_KEYS, **params}
    values = {k: None if params[k] == "None" else yaml.safe_load(params[k]) for k in keys if k in params}
    if len(values) != len(keys):
        raise ResumeError(f"run {run_id} lacks config params {sorted(set(keys) - set(values))[:5]}: "
                          "it was not made by this project")
    if values.get("data.data_dir") is not None:
        values["data.data_dir"] = params["data.data_dir"]  # a path stays a string
    return C.from_dict({}, values)


def check_resumable(run_id: str) -> None:
    """Cheap checks, no download: the run exists, is not FINISHED, is not still being trained
    by a live process (tracking/lifecycle/liveness.py) and has a checkpoint."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    if run.info.status == "FINISHED":
        raise ResumeError(f"run {run_id} is FINISHED: nothing to resume")
    if run.info.status == "RUNNING":
        verdict = liveness.judge(run)
        if verdict.alive:
            raise ResumeError(f"run {run_id} is still running ({verdict.reason}): stop that "
                              "process first (Ctrl-C keeps its checkpoint), then resume")
    if not any(a.path == f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"
               for a in client.list_artifacts(run_id, CHECKPOINT_DIR)):
        raise ResumeError(f"run {run_id} has no {CHECKPOINT_DIR}/{CHECKPOINT_FILE} to resume from "
                          "(it stopped before its first epoch ended)")


def resumed_threads(run_id: str) -> int:
    """The torch threads the run trained with: bf16 results depend on them, so a resume reuses
    them. Runs from before the setting trained with torch's default."""
    raw = mlflow.MlflowClient().get_run(run_id).data.params.get(THREADS_PARAM)
    return int(raw) if raw not in (None, "", "None") else T.TORCH_DEFAULT


STATE_KEYS = ("epoch", "model", "optimizer", "scheduler", "generator", "torch_rng", "history", "ema")


def load_checkpoint(run_id: str) -> dict:
    """The run's last checkpoint; refuses finished runs, runs without one, and a file that is not
    one (truncated by a full disk, or crafted: weights_only=True refuses code)."""
    check_resumable(run_id)
    name = f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name)
    try:
        state = torch.load(local, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - RuntimeError, UnpicklingError, EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ResumeError(f"run {run_id}'s {name} is truncated or not a checkpoint "
                          f"({type(exc).__name__}: {first[:200]})") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise ResumeError(f"run {run_id}'s {name} is not a checkpoint of this project "
                          f"(it lacks {', '.join(missing)})")
    return state


def log_unlogged_epochs(run_id: str, state: dict) -> None:
    """Metrics of the checkpoint's epochs that the run lacks: an epoch's metrics are logged after
    its checkpoint (tracking/lifecycle/runs.py), so a kill between the two leaves them only here."""
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "test_accuracy")}
    for h in state["history"]:
        if h["epoch"] not in logged:
            log_epoch(EpochMetrics(**h))
