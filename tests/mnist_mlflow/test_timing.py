"""mnist_mlflow.timing: an epoch's seconds from a slice, against the epoch itself."""

from __future__ import annotations

import time

import pytest

from mnist_mlflow import config as C
from mnist_mlflow.data import make_splits
from mnist_mlflow.timing import epoch_seconds
from mnist_mlflow.train import fit
from tests.conftest import ROOT


def test_a_probe_of_a_few_batches_predicts_the_whole_epoch(mnist):
    cfg = C.load(ROOT / "experiments/stage3.yaml", ["device=cpu", "threads=1", "optim.epochs=1"])
    train, evaluated = 24 * cfg.optim.batch_size, 1200
    estimate = epoch_seconds(cfg, mnist, train, evaluated, batches=6)
    splits = make_splits(mnist, train_limit=train, test_limit=evaluated)
    fit(cfg, splits, progress=False)  # kernels created, as before the probe's timed passes
    start = time.perf_counter()
    fit(cfg, splits, progress=False)
    actual = time.perf_counter() - start
    assert actual / 2 < estimate < actual * 2, (estimate, actual)


def test_bad_sizes_are_refused(mnist):
    cfg = C.load(ROOT / "experiments/stage3.yaml")
    with pytest.raises(ValueError, match="train_images=0"):
        epoch_seconds(cfg, mnist, 0, 100)
