"""What tracking.confirm decides and writes: candidate scores from validation, tables.

Pure functions of the runs' histories and configs; no MLflow or Optuna calls here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from mnist_mlflow.evaluation import HoldSummary, hold_summary


@dataclass(frozen=True)
class ScreenRun:
    """One screening run: a candidate under one seed, precision and thread count."""

    candidate: str
    seed: int
    precision: str
    threads: int
    run_id: str
    val_accuracy: list[float]  # per epoch, percent
    hold: HoldSummary  # of val_accuracy against the validation threshold

    def row(self) -> dict[str, Any]:
        h = self.hold
        return {"candidate": self.candidate, "seed": self.seed, "precision": self.precision,
                "threads": self.threads, "held": h.target_reached_epoch is not None,
                "hold_epoch": h.target_reached_epoch, "held_val_accuracy": h.held_accuracy,
                "longest_hold": h.hold_epochs, "best_val_accuracy": h.best_accuracy,
                "final_val_accuracy": self.val_accuracy[-1], "run_id": self.run_id}


def screen_run(candidate: str, seed: int, precision: str, threads: int, run_id: str,
               val_accuracy: list[float], threshold: float, hold: int) -> ScreenRun:
    return ScreenRun(candidate, seed, precision, threads, run_id, list(val_accuracy),
                     hold_summary(val_accuracy, threshold, hold))


@dataclass(frozen=True)
class Score:
    """A candidate's screening, from validation histories only."""

    candidate: str
    runs: int
    holds: int  # runs whose validation accuracy held the threshold for target.hold epochs
    hold_epoch_mean: float  # over the runs that held; nan when none did
    held_accuracy_mean: float  # the minimum over each held window, averaged; nan when none held
    longest_hold_mean: float  # epochs; tells apart candidates that never held
    final_accuracy_mean: float

    def key(self) -> tuple:
        """Sorts best first: most holds, then earliest hold, then highest held accuracy; among
        candidates that never held, the longest hold and then the final accuracy."""
        return (-self.holds, _or(self.hold_epoch_mean, math.inf), -_or(self.held_accuracy_mean, -math.inf),
                -self.longest_hold_mean, -self.final_accuracy_mean)

    def metrics(self) -> dict[str, float]:
        out = {"runs": self.runs, "holds": self.holds, "hold_epoch_mean": self.hold_epoch_mean,
               "held_val_accuracy_mean": self.held_accuracy_mean,
               "longest_hold_mean": self.longest_hold_mean,
               "final_val_accuracy_mean": self.final_accuracy_mean}
        return {k: float(v) for k, v in out.items() if not math.isnan(v)}


def _or(value: float, default: float) -> float:
    return default if math.isnan(value) else value


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def score(candidate: str, screens: list[ScreenRun]) -> Score:
    mine = [s for s in screens if s.candidate == candidate]
    held = [s.hold for s in mine if s.hold.target_reached_epoch is not None]
    return Score(candidate, len(mine), len(held), _mean([h.target_reached_epoch for h in held]),
                 _mean([h.held_accuracy for h in held]), _mean([s.hold.hold_epochs for s in mine]),
                 _mean([s.val_accuracy[-1] for s in mine]))


def rank(candidates: list[str], screens: list[ScreenRun]) -> list[Score]:
    """Best first; ties keep the candidates' order (the study's ranking, then the base)."""
    return sorted((score(c, screens) for c in candidates), key=Score.key)


def choose(scores: list[Score], base: str, sd: Optional[float], z: float = 1.96) -> tuple[str, str]:
    """The winner and why. With `sd` (one seed's hold-epoch sd, search.hold_epoch_sd) the
    top-ranked candidate replaces the base only when it held in at least as many runs and its
    mean hold epoch is earlier by more than z * sd * sqrt(1/n + 1/m) (n, m: the runs that held);
    otherwise the base stays. Without `sd`, the top-ranked candidate wins."""
    top = scores[0]
    if top.candidate == base:
        return base, f"{base} ranked first"
    if sd is None:
        return top.candidate, f"{top.candidate} ranked first (no search.hold_epoch_sd: no noise rule)"
    b = next(s for s in scores if s.candidate == base)  # ranked below top: top.holds >= b.holds
    if b.holds == 0:
        return top.candidate, f"{top.candidate} held in {top.holds} of {top.runs} runs, {base} in none"
    resolution = z * sd * math.sqrt(1 / top.holds + 1 / b.holds)
    gap = b.hold_epoch_mean - top.hold_epoch_mean
    verdict = (f"hold epoch {top.hold_epoch_mean:.2f} against {base}'s {b.hold_epoch_mean:.2f}: "
               f"{gap:.2f} epochs earlier, resolution {resolution:.2f} "
               f"({z:g} x sd {sd:g} x sqrt(1/{top.holds} + 1/{b.holds}))")
    if gap > resolution:
        return top.candidate, f"{top.candidate} beats {base} beyond the noise: {verdict}"
    return base, f"{base} stays: {top.candidate} ranked first but within the noise: {verdict}"


def test_verdict(winner: str, winner_rows: list[dict[str, Any]], base: str,
                 base_rows: list[dict[str, Any]], min_gain: float) -> tuple[str, str]:
    """The champion and why, from the final runs on test (same seeds and precisions): the
    validation winner replaces the base only when it held in every final run and its mean hold
    epoch is at least `min_gain` epochs earlier than the base's (or the base missed a run)."""
    def held(rows: list[dict[str, Any]]) -> list[int]:
        return [r["hold_epoch"] for r in rows if r["held"]]

    w, b = held(winner_rows), held(base_rows)
    counts = f"{winner} held the test target in {len(w)} of {len(winner_rows)} final runs, {base} in {len(b)} of {len(base_rows)}"
    if len(w) < len(winner_rows):
        return base, f"{base} stays: {counts} (the winner must hold in all)"
    if len(b) < len(base_rows):
        return winner, f"{winner} replaces {base}: {counts}"
    gap = _mean(b) - _mean(w)
    verdict = (f"{counts}; hold completed at epoch {_mean(w):.2f} on average against {base}'s "
               f"{_mean(b):.2f}: {gap:.2f} epochs earlier (needs >= {min_gain:g})")
    if gap >= min_gain - 1e-9:  # means of whole epochs: 8.7 - 7.7 is 0.99999...
        return winner, f"{winner} replaces {base} on test: {verdict}"
    return base, f"{base} stays: {verdict}"


# ---------------------------------------------------------------- tables

def csv(rows: list[dict[str, Any]]) -> str:
    import pandas as pd  # slow to import; only these tables need it

    return pd.DataFrame(rows).to_csv(index=False)


def final_row(candidate: str, seed: int, precision: str, run_id: str, hold: HoldSummary,
              test_accuracy: list[float]) -> dict[str, Any]:
    return {"candidate": candidate, "seed": seed, "precision": precision,
            "held": hold.target_reached_epoch is not None,
            "hold_epoch": hold.target_reached_epoch, "held_test_accuracy": hold.held_accuracy,
            "best_test_accuracy": hold.best_accuracy, "final_test_accuracy": test_accuracy[-1],
            "run_id": run_id}


def winner_line(s: Score, threshold: float, hold: int) -> str:
    when: Optional[str] = (f", hold completed at epoch {s.hold_epoch_mean:.1f} on average, held "
                           f"{s.held_accuracy_mean:.2f}%" if s.holds else
                           f", longest hold {s.longest_hold_mean:.1f} epochs on average")
    return (f"{s.candidate}: {s.holds} of {s.runs} runs held validation accuracy >= {threshold:g}% "
            f"for {hold} epochs{when}; final {s.final_accuracy_mean:.2f}%")
