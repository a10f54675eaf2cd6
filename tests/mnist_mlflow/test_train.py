import subprocess
import sys

import torch

from mnist_mlflow import config as C
from mnist_mlflow.data import make_splits
from mnist_mlflow.evaluation import hold_summary
from mnist_mlflow.train import fit


def test_short_run_on_a_subset_learns(mnist, tiny_config):
    seen = []
    result = fit(tiny_config, make_splits(mnist, train_limit=2000, test_limit=500),
                 on_epoch_end=seen.append, progress=False)
    assert [m.epoch for m in seen] == [1, 2] and result.history == seen
    assert seen[-1].test_accuracy > 80.0  # chance is 10%
    assert seen[-1].epoch_seconds > 0 and seen[0].lr > 0


def test_same_seed_gives_identical_metrics(mnist, tiny_config):
    cfg = C.replace(tiny_config, {"optim.epochs": 1, "augment.thickness_prob": 0.3})
    splits = make_splits(mnist, val_size=300, train_limit=600, test_limit=200)
    a = fit(cfg, splits, progress=False).history[0]
    b = fit(cfg, splits, progress=False).history[0]
    assert (a.train_loss, a.test_accuracy, a.val_accuracy) == (b.train_loss, b.test_accuracy, b.val_accuracy)


def test_bf16_lean_words16_trains_and_keeps_fp32_weights(mnist, tiny_config):
    cfg = C.replace(tiny_config, {"precision": "bf16", "model.arch": "lean", "model.width1": 8,
                                  "model.dropout_mask": "words16"})
    result = fit(cfg, make_splits(mnist, train_limit=2000, test_limit=500), progress=False)
    assert result.history[-1].test_accuracy > 80.0
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}


def test_epoch_callback_returning_true_stops_training(mnist, tiny_config):
    cfg = C.replace(tiny_config, {"optim.epochs": 3})
    result = fit(cfg, make_splits(mnist, train_limit=300, test_limit=100),
                 on_epoch_end=lambda m: m.epoch == 1, progress=False)
    assert [m.epoch for m in result.history] == [1]


def test_hold_summary_finds_first_four_epoch_hold():
    s = hold_summary([99.0, 99.41, 99.5, 99.3, 99.4, 99.45, 99.42, 99.47, 99.5], 99.4, 4)
    assert (s.hold_epochs, s.target_reached_epoch, s.held_accuracy, s.best_accuracy) == (5, 8, 99.4, 99.5)
    assert hold_summary([99.5, 99.5, 99.5], 99.4, 4).target_reached_epoch is None


def test_library_imports_neither_mlflow_nor_optuna():
    code = ("import sys, mnist_mlflow.train, mnist_mlflow.evaluation, mnist_mlflow.figures, "
            "mnist_mlflow.explore, mnist_mlflow.data; "
            "print(sorted(m for m in ('mlflow', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
