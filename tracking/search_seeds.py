"""The seeds a search already trained, read back as confirm's screening (``--seeds 0``).

A racing search trains every promising trial on `search.race.seeds` seeds, on the same
validation split and threshold that confirm screens on. Its FINISHED runs (the trial's own
and its race-seed runs) are read here from MLflow, so confirm can rank the candidates without
training them again. The base is the study's trial with the base config (the enqueued trial 0).
"""

from __future__ import annotations

import optuna
from mlflow import MlflowClient
from mlflow.entities import Run

from tracking import confirm_report as R
from tracking.lifecycle.checkpoints import THREADS_PARAM
from tracking.search import names as N


class NoRecordedSeeds(ValueError):
    """A candidate has no finished run in the study's store: it would need screening runs."""


def trial_runs(client: MlflowClient, trial: optuna.trial.FrozenTrial) -> list[Run]:
    """The trial's FINISHED runs: its own, then its race-seed runs (nested under it)."""
    run_id = trial.user_attrs.get(N.RUN_ATTR)
    experiment = trial.user_attrs.get(N.EXPERIMENT_ATTR)
    if not run_id or not experiment:
        return []
    found = client.search_runs(
        [experiment], f"tags.`{N.PARENT_TAG}` = '{run_id}' and tags.{N.ROLE} = '{N.RACE_ROLE}' "
                      f"and attributes.status = 'FINISHED'")
    own = client.get_run(run_id)
    return sorted(([own] if own.info.status == "FINISHED" else []) + found, key=lambda r: int(r.data.params["seed"]))


def val_history(client: MlflowClient, run_id: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, "val_accuracy"), key=lambda m: m.step)]


def recorded_screens(study: optuna.Study, trials: dict[str, int | None], threshold: float,
                     hold: int) -> list[R.ScreenRun]:
    """`trials`: candidate name -> its trial number in `study` (None: not in it). Raises
    NoRecordedSeeds, naming the candidate, where one has no finished run."""
    client = MlflowClient()
    out = []
    for name, number in trials.items():
        found = [] if number is None else trial_runs(client, study.trials[number])
        if not found:
            where = "is not in the study" if number is None else f"(trial {number}) has no FINISHED run here"
            raise NoRecordedSeeds(f"--seeds 0 ranks on the search's own runs, but {name} {where}; "
                                  "screen with --seeds 2 instead")
        for run in found:
            p = run.data.params
            val = val_history(client, run.info.run_id)
            if not val:  # no validation split: nothing to rank on
                raise NoRecordedSeeds(f"--seeds 0 ranks on validation, but {name}'s run {run.info.run_id} "
                                      "logged no val_accuracy; screen with --seeds 2 instead")
            out.append(R.screen_run(name, int(p["seed"]), p.get("precision", "?"),
                                    int(p.get(THREADS_PARAM, 0)), run.info.run_id, val, threshold, hold))
    return out
