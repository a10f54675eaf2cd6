"""What tracking.confirm decides and writes: candidate scores from validation, tables, recipe.yaml.

Pure functions of the runs' histories and configs; no MLflow or Optuna calls here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from mnist_mlflow import config as C
from mnist_mlflow.evaluation import HoldSummary, hold_summary

# Not part of a recipe: run plumbing, the machine, the data slice and the assignment's target.
RECIPE_SKIP = ("stage", "seed", "device", "study_data", "threads")
RECIPE_SKIP_PREFIXES = ("data.", "target.")


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


# ---------------------------------------------------------------- tables

def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def csv(rows: list[dict[str, Any]]) -> str:
    import pandas as pd  # an MLflow dependency

    return pd.DataFrame(rows).to_csv(index=False)


# ---------------------------------------------------------------- the recipe

def recipe_changes(cfg: C.RunConfig, base: C.RunConfig) -> dict[str, Any]:
    """The recipe keys (dotted) whose values differ from `base`'s."""
    ours, theirs = C.flatten(cfg), C.flatten(base)
    return {k: v for k, v in ours.items()
            if k not in RECIPE_SKIP and not k.startswith(RECIPE_SKIP_PREFIXES) and v != theirs.get(k)}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def recipe_yaml(cfg: C.RunConfig, base_path: Path, header: str = "") -> str:
    """A stage file: ``extends: <base file>`` plus only the keys that differ from it."""
    changes = recipe_changes(cfg, C.load(base_path))
    body = yaml.safe_dump({"extends": base_path.name, **nest(changes)}, sort_keys=False)
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + body


def resolve_recipe(text: str, folder: Path) -> C.RunConfig:
    """A recipe.yaml read back: its base file with its keys on top (what `extends:` means)."""
    raw = yaml.safe_load(text)
    base = C.load(folder / raw.pop("extends"))
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix.rstrip(".")] = node

    walk("", raw)
    return C.replace(base, flat)


def final_row(seed: int, precision: str, run_id: str, hold: HoldSummary,
              test_accuracy: list[float]) -> dict[str, Any]:
    return {"seed": seed, "precision": precision, "held": hold.target_reached_epoch is not None,
            "hold_epoch": hold.target_reached_epoch, "held_test_accuracy": hold.held_accuracy,
            "best_test_accuracy": hold.best_accuracy, "final_test_accuracy": test_accuracy[-1],
            "run_id": run_id}


def winner_line(s: Score, threshold: float, hold: int) -> str:
    when: Optional[str] = (f", hold completed at epoch {s.hold_epoch_mean:.1f} on average, held "
                           f"{s.held_accuracy_mean:.2f}%" if s.holds else
                           f", longest hold {s.longest_hold_mean:.1f} epochs on average")
    return (f"{s.candidate}: {s.holds} of {s.runs} runs held validation accuracy >= {threshold:g}% "
            f"for {hold} epochs{when}; final {s.final_accuracy_mean:.2f}%")
