"""Loss and accuracy on a set, the hold of the target and the search's score of it (lower is better)."""

import pytest
import torch

from mnist_mlflow.evaluation import best_window, evaluate, hold_score, hold_summary, predict_logits

T, HOLD, HORIZON = 99.3, 4, 15


def test_an_earlier_hold_scores_lower_and_the_held_accuracy_breaks_ties():
    early = [99.0, 99.31, 99.32, 99.33, 99.34]                 # completes at epoch 5
    late = [99.0, 99.2, 99.31, 99.35, 99.6, 99.6]              # completes at epoch 6, held higher
    assert hold_score(early, T, HOLD, HORIZON) < hold_score(late, T, HOLD, HORIZON)
    higher = [99.0, 99.45, 99.45, 99.45, 99.45]
    assert 4 < hold_score(higher, T, HOLD, HORIZON) < hold_score(early, T, HOLD, HORIZON) <= 5


def test_never_holding_ranks_behind_every_hold_and_by_how_close_it_came():
    latest_hold = [98.0] * 11 + [99.3] * 4                     # completes at the horizon
    close = [99.0, 99.29, 99.29, 99.29, 99.29, 99.1]          # best 4-epoch window: 0.01 short
    far = [99.0, 99.25, 99.28, 99.0, 99.29, 99.29]             # best window 99.0: 0.3 short
    assert hold_score(latest_hold, T, HOLD, HORIZON) <= 15
    assert 16 < hold_score(close, T, HOLD, HORIZON) < hold_score(far, T, HOLD, HORIZON)
    assert hold_score(close, T, HOLD, HORIZON) == pytest.approx(16.01)
    assert best_window(far, HOLD) == pytest.approx(99.0)
    assert best_window([98.0, 99.0], HOLD) == 98.0  # fewer epochs than the hold: their minimum


def test_the_score_agrees_with_the_hold_summary():
    acc = [98.0, 99.35, 99.4, 99.36, 99.38, 99.2, 99.5]
    s = hold_summary(acc, T, HOLD)
    assert s.target_reached_epoch == 5
    assert hold_score(acc, T, HOLD, HORIZON) == pytest.approx(5 - 0.99 * (99.35 - T) / (100 - T))
    with pytest.raises(ValueError):
        hold_score([], T, HOLD, HORIZON)


def test_hold_summary_finds_first_four_epoch_hold():
    s = hold_summary([99.0, 99.41, 99.5, 99.3, 99.4, 99.45, 99.42, 99.47, 99.5], 99.4, 4)
    assert (s.hold_epochs, s.target_reached_epoch, s.held_accuracy, s.best_accuracy) == (5, 8, 99.4, 99.5)
    assert hold_summary([99.5, 99.5, 99.5], 99.4, 4).target_reached_epoch is None


def test_evaluate_gives_mean_cross_entropy_and_percent_accuracy_in_eval_mode():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9))  # logits: the pixels
    x = torch.zeros(600, 1, 1, 3, dtype=torch.uint8)
    x[:, 0, 0, 0] = 255  # class 0 always wins
    y = torch.zeros(600, dtype=torch.long)
    y[:150] = 1
    model.train()
    loss, acc = evaluate(model, x, y)
    assert acc == pytest.approx(75.0)  # no dropout: evaluated in eval mode, over batches of 256
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(x.flatten(1).float(), y).item())
    assert model.training  # its mode is restored
    assert predict_logits(model, x, batch=7).shape == (600, 3)
