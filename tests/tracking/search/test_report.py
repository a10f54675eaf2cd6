"""The search's trials table (tracking/search/report.py): Optuna's table with our trial states."""

from __future__ import annotations

import math

import optuna
from optuna.trial import TrialState

from tracking.search import names as N
from tracking.search import report


def test_the_trials_table_is_optunas_with_our_states_and_without_the_configs():
    study = optuna.create_study()
    assert report.trials_table(study).empty

    held = study.ask()
    held.suggest_float("optim.lr", 0.001, 0.1, log=True)
    for epoch, value in ((1, 16.0), (2, 9.5)):
        held.report(value, epoch)
    for key, value in {N.CONFIG: {"optim.lr": 0.01}, N.RUN_ATTR: "run-0", N.NUM_PARAMS: 7814,
                       N.SEED_SCORES: {"1": 9.0, "2": 10.0}}.items():
        held.set_user_attr(key, value)
    study.tell(held, 9.5)
    rejected = study.ask()
    rejected.suggest_float("optim.lr", 0.001, 0.1, log=True)
    rejected.set_user_attr(N.REJECTED_ATTR, "9,001 parameters, over the budget of 8,000")
    study.tell(rejected, state=TrialState.PRUNED)

    table = report.trials_table(study)
    assert list(table.columns[:4]) == ["number", N.TRIAL_STATE, "value", "last_epoch"]
    assert table[N.TRIAL_STATE].tolist() == [N.COMPLETE, N.REJECTED]
    assert table["state"].tolist() == ["COMPLETE", "PRUNED"]  # Optuna's own
    assert table["value"][0] == 9.5 and table["last_epoch"][0] == 2 and math.isnan(table["last_epoch"][1])
    assert table["user_attrs_mlflow_run_id"][0] == "run-0" and table["user_attrs_num_params"][0] == 7814
    assert "params_optim.lr" in table.columns and f"user_attrs_{N.CONFIG}" not in table.columns
    assert table.to_csv(index=False).count("\n") == 3  # a header and one line a trial
