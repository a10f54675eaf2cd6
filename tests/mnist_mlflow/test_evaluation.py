"""The hold of the target and the search's score of it (lower is better)."""

import pytest

from mnist_mlflow.evaluation import best_window, hold_score, hold_summary

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
