"""What a search's parent run holds: counts, the best trial, Optuna's figures, best_config.yaml.

Everything here reads the whole study, so a resumed search reports on all its trials,
including those of earlier invocations.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from typing import TYPE_CHECKING, Optional

import mlflow
import optuna
from mlflow.entities import Metric, Param
from optuna.trial import FrozenTrial, TrialState

from mnist_mlflow import config as C
from mnist_mlflow import figures  # its import also selects the headless matplotlib backend
from tracking.search import names as N
from tracking.search.space import SearchSpec

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)
BEST_CONFIG = "best_config.yaml"


def trial_state(t: FrozenTrial) -> str:
    """The trial's state as its run's `trial_state` tag says it (names.STATES), from Optuna's:
    REJECTED and STOPPED trials are PRUNED there, SURPLUS ones FAIL; RUNNING counts queued ones too."""
    if t.state == TrialState.PRUNED:
        if N.REJECTED_ATTR in t.user_attrs:
            return N.REJECTED
        return N.STOPPED if N.STOPPED_ATTR in t.user_attrs else N.PRUNED
    if t.state == TrialState.FAIL and t.user_attrs.get(N.SURPLUS_ATTR):
        return N.SURPLUS
    return {TrialState.COMPLETE: N.COMPLETE, TrialState.FAIL: N.FAIL}.get(t.state, N.RUNNING)


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials per state, every state present."""
    c = Counter(trial_state(t) for t in study.get_trials(deepcopy=False))
    return {s: c.get(s, 0) for s in N.STATES}


def best_trial(study: optuna.Study) -> Optional[FrozenTrial]:
    """The best COMPLETE, feasible trial; None before there is one.

    Rejected trials are PRUNED, and Optuna picks the best among COMPLETE trials only, and
    among those only feasible ones (constraint <= 0): over budget can never win.
    """
    try:
        return study.best_trial
    except ValueError:  # no complete (or no feasible) trial yet
        return None


def best_config(trial: FrozenTrial) -> C.RunConfig:
    """The exact config the trial trained (stored with it), renamed stage `search-best`."""
    flat = {**trial.user_attrs[N.CONFIG], "stage": "search-best"}
    return C.from_dict({}, flat)


def best_config_yaml(study: optuna.Study, trial: FrozenTrial, spec: SearchSpec) -> str:
    """An experiment file for experiments/: stage 3's, with the trial's differences."""
    held = trial.user_attrs.get(N.VAL_HOLD_EPOCH)
    header = (f"Best trial of Optuna study {study.study_name!r}: trial {trial.number}, objective "
              f"{trial.value:.4f} ({objective_text(spec)}; "
              + (f"validation hold completed at epoch {held}" if held else "never held") +
              f"), {trial.user_attrs[N.NUM_PARAMS]:,} parameters.\n"
              "Copy it to experiments/ and train it as stage 3 does, on all 60,000 images:\n"
              "  python -m tracking.stage experiments/best_config.yaml\n"
              "or confirm it over seeds and numerics first: python -m tracking.confirm")
    return C.derived_yaml(best_config(trial), spec.extends, header, stage="search-best")


def objective_text(spec: SearchSpec) -> str:
    t = spec.base.target
    return (f"epoch at which validation accuracy has held >= {spec.threshold:g}% for {t.hold} "
            f"epochs, lower is better; never held: {spec.horizon + 1} + points short")


def log_summary(study: optuna.Study, spec: SearchSpec, run_id: str) -> Optional[FrozenTrial]:
    """Into the parent run: counts, best params and value, figures, trials table.

    Through the client, not the active run: a shared search's parent is no worker's own run.
    Logging it again is harmless (same params; metrics and files are replaced).
    """
    client = mlflow.MlflowClient()
    n = counts(study)
    metrics = {N.COUNT_METRICS[s]: v for s, v in n.items()} | throughput(study)
    best = best_trial(study)
    if best is not None:
        if best.user_attrs[N.NUM_PARAMS] > spec.budget:  # cannot happen; never report it
            raise RuntimeError(f"best trial {best.number} is over the parameter budget")
        params = {**{f"best.{k}": v for k, v in best.params.items()}, "best.trial_number": best.number}
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        metrics["best_value"] = best.value
        client.set_tag(run_id, "best_trial_number", best.number)
        client.set_tag(run_id, "best_trial_run_id", best.user_attrs.get(N.RUN_ATTR, ""))
        client.log_text(run_id, best_config_yaml(study, best, spec), BEST_CONFIG)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    log_trials_table(study, client, run_id)
    log_figures(study, n, client, run_id)
    return best


def throughput(study: optuna.Study) -> dict[str, float]:
    """Epochs trained by all trials (racing seeds included), and per hour of the study's span."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start]
    epochs = sum(t.user_attrs.get(N.EPOCHS_TRAINED, 0) for t in trials)
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    if not ends:
        return {"epochs_trained": epochs}
    hours = (max(ends) - min(t.datetime_start for t in trials)).total_seconds() / 3600
    return {"epochs_trained": epochs, "epochs_per_hour": epochs / hours if hours > 0 else 0.0}


# Optuna's columns for trials.csv: params_<config path>, user_attrs_<name> (mlflow_run_id,
# num_params, epochs_trained, seed_scores, ...); the flat config each trial trained is left out.
TABLE_ATTRS = ("number", "value", "state", "datetime_start", "datetime_complete", "duration",
               "params", "user_attrs")
TABLE_LEFT_OUT = (f"user_attrs_{N.CONFIG}",)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Optuna's trials table, with our trial_state beside Optuna's state and the last epoch
    reported; empty without trials."""
    df = study.trials_dataframe(attrs=TABLE_ATTRS)
    if df.empty:
        return df
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    df.insert(1, N.TRIAL_STATE, [trial_state(trials[n]) for n in df["number"]])
    df.insert(3, "last_epoch", [max(trials[n].intermediate_values, default=None) for n in df["number"]])
    return df.drop(columns=[c for c in TABLE_LEFT_OUT if c in df.columns])


def log_trials_table(study: optuna.Study, client: mlflow.MlflowClient, run_id: str) -> None:
    table = trials_table(study)
    if not table.empty:
        client.log_text(run_id, table.to_csv(index=False), "trials.csv")


def log_figures(study: optuna.Study, n: dict[str, int], client: mlflow.MlflowClient,
                run_id: str) -> None:
    """Optuna's matplotlib plots; one that cannot be drawn yet is skipped, never fatal."""
    from optuna.visualization import matplotlib as ovm

    plots = {"optimization_history": ovm.plot_optimization_history,
             "parallel_coordinate": ovm.plot_parallel_coordinate,
             "intermediate_values": ovm.plot_intermediate_values}
    if n[N.COMPLETE] >= 2:  # importances compare complete trials
        plots["param_importances"] = ovm.plot_param_importances
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)  # e.g. flat axes with few trials
                ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(10, 6)
            client.log_figure(run_id, fig, f"figures/{name}.png")
        except Exception as exc:  # noqa: BLE001 - e.g. too few trials for this plot
            log.warning("skipped figure %s: %r", name, exc)
        finally:
            figures.plt.close("all")
