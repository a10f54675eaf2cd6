"""The search file (tracking/search/space.py): what it refuses, what it derives from stage 3,
the assignment's fixed points and the budget."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml

from mnist_mlflow import config as C
from mnist_mlflow.config import ConfigError
from mnist_mlflow.models import param_count_of
from tests.conftest import ROOT
from tests.tracking.search.helpers import ROTATION, SEARCH_YAML, write_search
from tracking.search import names as N
from tracking.search.report import best_config_yaml
from tracking.search.space import load_search


@pytest.mark.parametrize("space, message", [
    ({"optim.lrr": {"type": "float", "low": 0.001, "high": 0.1}},
     "unknown config path 'optim.lrr' .*did you mean 'optim.lr'"),
    ({"model.max_params": {"type": "int", "low": 7000, "high": 9000}}, "cannot be searched"),
    ({"data.val_size": {"type": "int", "low": 1, "high": 9}}, "same validation split"),
    ({"augment.rotation_degrees": {"type": "float", "low": 0, "high": 200}}, "config refuses"),
    ({"optim.lr": {"type": "float", "low": "1e-3", "high": 0.1}}, "write 1.0e-3"),
    ({"optim.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "space.optim.lr"),
    ({"optim.lr": {"type": "uniform", "low": 0.1, "high": 0.2}}, "float | int | categorical"),
    ({"optim.lr": {"type": "float", "low": 0.1, "high": 0.2, "choices": [1]}}, "unknown key 'choices'"),
    ({"schedule.max_lr": {"type": "float", "low": 0.01, "high": 0.1, "when": {"schedule.name": "onecycle"}},
      "schedule.name": {"type": "categorical", "choices": ["onecycle", "step"]}}, "sampled at or after"),
    ({"schedule.name": {"type": "categorical", "choices": ["onecycle", "step"]},
      "schedule.gamma": {"type": "float", "low": 0.1, "high": 0.5, "when": {"schedule.name": "stepp"}}},
     "never sampled"),
])
def test_bad_space_is_refused_with_the_reason(tmp_path, space, message):
    with pytest.raises(ConfigError, match=message):
        load_search(write_search(tmp_path, space))


@pytest.mark.parametrize("settings, message", [
    ({"pruner": {"name": "medain"}}, "search.pruner"),
    ({"pruner": {"name": "median", "n_warmup": 3}}, "median"),
    ({"objective_last_epoch": 4}, "unknown key 'search.objective_last_epoch'"),
])
def test_bad_search_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        load_search(write_search(tmp_path, ROTATION, **settings))


def test_the_search_file_is_stage_3_apart_from_the_keys_it_declares():
    """Derived, never copied: a stage-3 recipe change reaches the search's base config."""
    spec = load_search(SEARCH_YAML)
    declared = C.flatten(C.from_dict({k: v for k, v in yaml.safe_load(SEARCH_YAML.read_text()).items()
                                      if k not in ("extends", "search", "space")}))
    declared = {k for k, v in declared.items() if v != C.flatten(C.RunConfig())[k]}
    stage3, base = C.flatten(C.load(ROOT / "experiments/stage3.yaml")), C.flatten(spec.base)
    drift = {k: (stage3[k], base[k]) for k in stage3 if stage3[k] != base[k] and k not in declared}
    assert drift == {}
    assert declared == {"stage", "data.val_size"}
    assert spec.extends == str(ROOT / "experiments/stage3.yaml")


def test_the_search_file_keeps_the_assignments_fixed_points_and_searches_the_rest():
    spec = load_search(SEARCH_YAML)
    space = {p.path: p for p in spec.space}
    assert spec.budget == 8000 and spec.base.model.max_params == 8000
    assert spec.base.model.dropout == 0.05 and spec.base.augment.rotation_degrees == 6.9
    assert not {"model.dropout", "augment.rotation_degrees", "model.max_params"} & set(space)
    # the mission's: the learning-rate schedule, augmentation strength, weight averaging, batch size
    assert set(space) == {"optim.epochs", "schedule.max_lr", "schedule.pct_start", "schedule.div_factor",
                          "schedule.final_div_factor", "schedule.anneal", "augment.translate_px",
                          "augment.thickness_prob", "optim.ema_decay", "optim.batch_size"}
    assert spec.horizon == 15 and spec.threshold == pytest.approx(99.2)
    assert spec.settings.race["seeds"] > 1 and spec.settings.budget_minutes == 60 and spec.settings.hard_budget
    with pytest.raises(ConfigError, match="fixes it"):  # the file refuses to search them
        load_search(write_search(Path(tempfile.mkdtemp()), ROTATION,
                                 fixed=["augment.rotation_degrees"]))


def test_the_architecture_search_searches_only_the_widths_of_stage_3s_recipe():
    arch, stage3 = load_search(ROOT / "experiments/search_arch.yaml"), C.load(ROOT / "experiments/stage3.yaml")
    assert {p.path for p in arch.space} == {"model.width1", "model.width2", "model.width_transition",
                                            "model.width3", "model.width4", "model.width5", "model.width6"}
    a, b = C.flatten(arch.base), C.flatten(stage3)
    assert {k for k in a if a[k] != b[k]} == {"stage", "data.val_size"}
    assert load_search(ROOT / "experiments/search_arch.yaml", max_params=5000).budget == 5000


@pytest.mark.parametrize("race, match", [({"seeds": 0}, "race.seeds"), ({"margin": -1}, "race.margin"),
                                         ({"rounds": 2}, "search.race")])
def test_a_bad_race_setting_is_refused(tmp_path, race, match):
    with pytest.raises(ConfigError, match=match):
        load_search(write_search(tmp_path, ROTATION, race=race))


@pytest.mark.parametrize("sd", [0, -1.6, "1.6", True, float("inf")])
def test_a_bad_hold_epoch_sd_is_refused(tmp_path, sd):
    with pytest.raises(ConfigError, match="search.hold_epoch_sd"):
        load_search(write_search(tmp_path, ROTATION, hold_epoch_sd=sd))


def test_the_sgd_search_is_the_search_with_sgd_its_lr_range_and_nesterov():
    """experiments/search_sgd.yaml derives from search.yaml: only the optimizer's keys differ."""
    adam, sgd = load_search(SEARCH_YAML), load_search(ROOT / "experiments/search_sgd.yaml")
    a, b = C.flatten(adam.base), C.flatten(sgd.base)
    assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == {"optim.name": ("adam", "sgd")}
    assert sgd.settings == dataclasses.replace(adam.settings, study_name="mnist-hold-sgd", enqueue_base=False)
    space_a, space_b = ({p.path: p.distribution for p in s.space} for s in (adam, sgd))
    differs = {k for k in space_a.keys() | space_b.keys() if space_a.get(k) != space_b.get(k)}
    assert differs == {"optim.name", "optim.nesterov", "schedule.max_lr"}
    assert space_b["optim.name"].choices == ("sgd",) and space_b["optim.nesterov"].choices == (False, True)
    assert space_b["schedule.max_lr"].low > space_a["schedule.max_lr"].low  # SGD wants ~10x Adam's
    assert sgd.extends == adam.extends == str(ROOT / "experiments/stage3.yaml")  # best_config.yaml's base


def test_the_sgd_searchs_best_config_extends_stage_3_and_trains_as_it_is(tmp_path):
    """Its best_config.yaml extends the stage file, not search.yaml (whose `search:` key a run
    config refuses): the first SGD search on full MNIST failed at this step."""
    spec = load_search(ROOT / "experiments/search_sgd.yaml")
    cfg = C.replace(spec.base, {"optim.nesterov": True, "schedule.max_lr": 0.2})
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=16.2, user_attrs={
        N.CONFIG: C.flatten(cfg), N.NUM_PARAMS: param_count_of(cfg.model)}))
    (tmp_path / "stage3.yaml").write_text((ROOT / "experiments/stage3.yaml").read_text())
    (tmp_path / "best.yaml").write_text(best_config_yaml(study, study.trials[0], spec))
    best = C.load(tmp_path / "best.yaml")
    assert (best.optim.name, best.optim.nesterov, best.schedule.max_lr) == ("sgd", True, 0.2)
    assert best.data.val_size == 0  # trains on all 60,000 images


def test_best_config_and_recipe_leave_the_same_keys_to_stage_3():
    """One rule for both derived files: the machine, seed, data slice and target are stage 3's,
    and an explicit width equal to its null default ("as width2") is no difference."""
    spec = load_search(ROOT / "experiments/search.yaml")
    stage3 = C.load(ROOT / "experiments/stage3.yaml")
    cfg = C.replace(stage3, {"schedule.max_lr": 0.02, "seed": 7, "device": "cpu", "threads": 1,
                             "model.width3": stage3.model.width2, "data.val_size": 5000})
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=16.2, user_attrs={
        N.CONFIG: C.flatten(cfg), N.NUM_PARAMS: param_count_of(cfg.model)}))
    best = yaml.safe_load(best_config_yaml(study, study.trials[0], spec))
    assert best == {"extends": "stage3.yaml", "stage": "search-best", "schedule": {"max_lr": 0.02}}
    assert yaml.safe_load(C.derived_yaml(cfg, ROOT / "experiments/stage3.yaml")) == {
        "extends": "stage3.yaml", "schedule": {"max_lr": 0.02}}


def test_the_budget_is_a_search_setting_and_binds(tmp_path):
    spec = load_search(SEARCH_YAML, max_params=5000)
    assert spec.budget == spec.base.model.max_params == 5000
    small = C.ModelConfig(width1=6, width2=10, width_transition=6, width3=10, width4=10,
                          width5=10, max_params=None)
    assert param_count_of(small) <= 5000 < param_count_of(C.ModelConfig(max_params=None))
