"""Shared by the search tests and the tests of what builds on a search (confirm, tune, the UI):
search files, options and trials on slivers of real MNIST (256 training, 500 validation, 300
test images, 1-2 epochs), so each trial takes seconds."""

from __future__ import annotations

from pathlib import Path

import mlflow
import yaml

from tests.conftest import ROOT
from tracking.lifecycle import runs
from tracking.search.plan import Options

SEARCH_YAML = ROOT / "experiments/search.yaml"
ROTATION = {"augment.rotation_degrees": {"type": "float", "low": 0.0, "high": 15.0}}


def write_search(tmp_path: Path, space: dict, **settings) -> Path:
    """experiments/search.yaml with another space and search settings (by default no fixed
    paths, no incumbent trial, so that trial numbers are the sampler's, one worker and one seed
    per trial)."""
    raw = yaml.safe_load(SEARCH_YAML.read_text())
    raw["extends"] = str(SEARCH_YAML.parent / raw["extends"])
    raw["space"] = space
    raw["search"].update({"fixed": [], "enqueue_base": False, "workers": 1,
                          "race": {"seeds": 1, "margin": 0.0}, **settings})
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def options(tmp_path: Path, config: Path, **changes) -> Options:
    base = dict(config=str(config), n_trials=2, epochs=1, storage=f"journal:{tmp_path}/optuna.log",
                study_name="test-study", sampler_seed=0, train_limit=256, test_limit=300,
                experiment="search-test", overrides=("data.val_size=500", "device=cpu"))
    return Options(**{**base, **changes})


def child_runs(parent_id: str) -> list:
    """The parent's child runs, in trial order."""
    client = mlflow.MlflowClient()
    exp = client.get_run(parent_id).info.experiment_id
    found = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return sorted(found, key=lambda r: int(r.data.tags["optuna.trial_number"]))


def fit_that(monkeypatch, *, raise_on_call: int, error: BaseException):
    """Makes the `raise_on_call`-th training (from 1) raise `error` inside its MLflow run."""
    real_fit, calls = runs.fit, []

    def fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == raise_on_call:
            raise error
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(runs, "fit", fit)
    return calls


def shared(tmp_path, config, **changes) -> Options:
    return options(tmp_path, config, n_trials=None, storage=f"sqlite:///{tmp_path}/optuna.db",
                   **changes)
