"""How long an epoch of a config takes on this machine, measured on a slice of it.

A short `fit` of 1 + `repeats` epochs of `batches` training batches, each epoch with an
evaluation pass as long, relative to its training images, as the full epoch's. The first epoch
creates the kernels; of the others, the fastest (another process's burst only slows an epoch),
timed by `fit` itself (the epoch alone, no setup), is scaled by the images a full epoch trains.
tracking.tune sizes its search by it.
"""

from __future__ import annotations

from mnist_mlflow import config as C
from mnist_mlflow.data import Mnist, make_splits
from mnist_mlflow.train import fit

PROBE_BATCHES = 60


def epoch_seconds(cfg: C.RunConfig, mnist: Mnist, train_images: int, eval_images: int,
                  batches: int = PROBE_BATCHES, repeats: int = 3) -> float:
    """Seconds one epoch of `cfg` (its precision, threads and batch size) takes when it trains
    `train_images` and evaluates `eval_images` (validation and test) after it."""
    if train_images < 1 or eval_images < 0:
        raise ValueError(f"train_images={train_images}, eval_images={eval_images}: need >= 1 and >= 0")
    images = min(batches * cfg.optim.batch_size, train_images)
    evaluated = max(1, round(images * eval_images / train_images))
    probe = C.replace(cfg, {"optim.epochs": 1 + repeats, "data.val_size": 0, "data.train_limit": images,
                            "data.test_limit": evaluated})
    history = fit(probe, make_splits(mnist, train_limit=images, test_limit=evaluated), progress=False).history
    return min(h.epoch_seconds for h in history[1:]) * train_images / images
