"""How long an epoch of a config takes on this machine, measured on a slice of it.

Short `fit`s of `batches` and of 2 x `batches` training batches, each with an evaluation pass
as long, relative to its training images, as the full epoch's, after one to create the kernels:
the difference is what `batches` more batches cost, without the setup every fit pays once. Scaled
by the images a full epoch trains. tracking.tune sizes its search by it.
"""

from __future__ import annotations

import time

from mnist_mlflow import config as C
from mnist_mlflow.data import Mnist, make_splits
from mnist_mlflow.train import fit

PROBE_BATCHES = 40


def epoch_seconds(cfg: C.RunConfig, mnist: Mnist, train_images: int, eval_images: int,
                  batches: int = PROBE_BATCHES) -> float:
    """Seconds one epoch of `cfg` (its precision, threads and batch size) takes when it trains
    `train_images` and evaluates `eval_images` (validation and test) after it."""
    if train_images < 1 or eval_images < 0:
        raise ValueError(f"train_images={train_images}, eval_images={eval_images}: need >= 1 and >= 0")
    images = batches * cfg.optim.batch_size

    def timed(n: int) -> float:
        evaluated = max(1, round(n * eval_images / train_images))
        probe = C.replace(cfg, {"optim.epochs": 1, "data.val_size": 0, "data.train_limit": n,
                                "data.test_limit": evaluated})
        splits = make_splits(mnist, train_limit=n, test_limit=evaluated)
        start = time.perf_counter()
        fit(probe, splits, progress=False)
        return time.perf_counter() - start

    timed(images)  # kernels and caches
    one, two = timed(images), timed(2 * images)
    return max(two - one, one / 2) * train_images / images
