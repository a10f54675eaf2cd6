"""What a model and a finished training run are judged by: loss and accuracy on a set, the
hold of the target, and its errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EVAL_BATCH = 256  # small enough that a batch's activations stay in the CPU's cache


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, batch: int = EVAL_BATCH) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch].float()) for i in range(0, len(x), batch)])
    model.train(was_training)
    return out


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy in percent)."""
    logits = predict_logits(model, x)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item() * 100.0
    return loss, acc


@dataclass(frozen=True)
class HoldSummary:
    best_accuracy: float
    hold_epochs: int  # longest run of consecutive epochs >= target
    target_reached_epoch: Optional[int]  # epoch (from 1) at which the first `hold`-long run completed
    held_accuracy: Optional[float]  # minimum accuracy over that first qualifying window


def hold_summary(accuracies: Sequence[float], target: float = 99.4, hold: int = 4) -> HoldSummary:
    """Reads a per-epoch accuracy history (percent, epoch 1 first)."""
    longest = run = 0
    reached = held = None
    for epoch, acc in enumerate(accuracies, start=1):
        run = run + 1 if acc >= target else 0
        longest = max(longest, run)
        if reached is None and run >= hold:
            reached = epoch
            held = float(min(accuracies[epoch - hold:epoch]))
    best = float(max(accuracies)) if len(accuracies) else float("nan")
    return HoldSummary(best, longest, reached, held)


def best_window(accuracies: Sequence[float], hold: int) -> float:
    """The highest accuracy held for `hold` consecutive epochs (for fewer epochs: their minimum)."""
    n = min(hold, len(accuracies))
    return float(max(min(accuracies[i:i + n]) for i in range(len(accuracies) - n + 1)))


def hold_score(accuracies: Sequence[float], threshold: float, hold: int, horizon: int) -> float:
    """How soon a `hold`-epoch run at >= threshold completes; lower is better.

    Held: the epoch it completed, less up to 0.99 for how far above the threshold it held
    (of the room up to 100 %), so the held accuracy only breaks ties between equal epochs.
    Never held: horizon + 1 plus how many points the best `hold`-epoch window stayed below
    the threshold, so it ranks behind every hold, and by how close it came.
    """
    if not len(accuracies):
        raise ValueError("hold_score needs at least one epoch")
    s = hold_summary(accuracies, threshold, hold)
    if s.target_reached_epoch is not None:
        above = (s.held_accuracy - threshold) / max(100.0 - threshold, 1e-9)
        return s.target_reached_epoch - 0.99 * min(max(above, 0.0), 1.0)
    return horizon + 1 + (threshold - best_window(accuracies, hold))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int = 10) -> np.ndarray:
    """Rows are true labels, columns predictions."""
    return np.bincount(y_true * classes + y_pred, minlength=classes * classes).reshape(classes, classes)


def misclassified(y_true: np.ndarray, y_pred: np.ndarray, limit: int = 25) -> np.ndarray:
    """Indices of the first `limit` wrong predictions."""
    return np.flatnonzero(y_true != y_pred)[:limit]
