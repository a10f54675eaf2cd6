"""The study (tracking/search/study.py, sampling.py): its first trial, seeds, safe resuming."""

from __future__ import annotations

import multiprocessing

import optuna
import pytest
from mnist_mlflow import config as C
from mnist_mlflow.config import ConfigError
from mnist_mlflow.models import param_count_of
from tests.tracking.search.helpers import ROTATION, SEARCH_YAML, write_search
from tracking.search import study as search_study
from tracking.search.sampling import make_sampler, sample_params
from tracking.search.space import load_search


def test_the_base_config_is_the_first_trial(tmp_path):
    spec = load_search(SEARCH_YAML)
    storage = search_study.open_storage(f"journal:{tmp_path}/optuna.log")
    study, _ = search_study.open_study(spec, storage, "s")
    trial = study.ask()
    cfg = C.replace(spec.base, sample_params(trial, spec.space, spec.base))
    assert trial.user_attrs["incumbent"] is True
    assert param_count_of(cfg.model) == param_count_of(spec.base.model) == 7814
    flat, base = C.flatten(cfg), C.flatten(spec.base)
    assert {k for k in flat if flat[k] != base[k]} <= {
        "optim.weight_decay", "model.width_transition", "model.width3", "model.width4", "model.width5"}
    assert cfg.optim.weight_decay <= 1e-6  # 0 clipped into the log range


@pytest.mark.parametrize("name, cls", [("tpe", optuna.samplers.TPESampler),
                                       ("gp", optuna.samplers.GPSampler),
                                       ("random", optuna.samplers.RandomSampler)])
def test_the_search_file_names_its_sampler_and_the_seed_fixes_it(tmp_path, name, cls):
    spec = load_search(write_search(tmp_path, ROTATION, sampler={"name": name, "seed": 0, "n_startup_trials": 2}))

    def best(seed: int) -> list[float]:
        sampler = make_sampler(spec.settings, seed)
        assert isinstance(sampler, cls)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        study.optimize(lambda t: (sample_params(t, spec.space, spec.base)["augment.rotation_degrees"] - 3) ** 2,
                       n_trials=4)
        return [t.value for t in study.trials]

    assert best(1) == best(1)


def test_an_unknown_sampler_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="search.sampler.name.*tpe or gp or random"):
        load_search(write_search(tmp_path, ROTATION, sampler={"name": "cmaes"}))


def test_the_seed_fixes_the_sampled_params():
    spec = load_search(SEARCH_YAML)

    def sampled(seed: int) -> list[dict]:
        study = optuna.create_study(direction="minimize", sampler=make_sampler(spec.settings, seed))
        # 10 trials: past the 8 random startup trials, into TPE proper
        study.optimize(lambda t: sample_params(t, spec.space, spec.base)["schedule.max_lr"],
                       n_trials=10)
        return [t.params for t in study.trials]

    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)
    seeds = {search_study.sampler_seed(3, n_existing, worker) for n_existing in (0, 2) for worker in (0, 1)}
    assert len(seeds) == 4  # workers and resumed runs never replay each other's samples


def test_a_study_resumes_only_under_the_same_fixed_settings(tmp_path):
    storage = search_study.open_storage(f"journal:{tmp_path}/optuna.log")
    config = write_search(tmp_path, ROTATION)
    search_study.open_study(load_search(config, {"optim.epochs": 3}), storage, "s")
    search_study.open_study(load_search(config, {"optim.epochs": 3}), storage, "s")  # resumes
    with pytest.raises(ConfigError, match=r"horizon=3 \(now 5\)"):
        search_study.open_study(load_search(config, {"optim.epochs": 5}), storage, "s")


def test_a_study_resumes_only_with_its_search_space(tmp_path):
    """search.yaml's study resumed with search_sgd.yaml: Optuna would fail the trials one by
    one (a categorical's choices) or mix two spaces silently (a float's range)."""
    storage = search_study.open_storage(f"journal:{tmp_path}/optuna.log")
    search_study.open_study(load_search(SEARCH_YAML), storage, "sp")
    search_study.open_study(load_search(SEARCH_YAML), storage, "sp")  # resumes
    sgd = SEARCH_YAML.parent / "search_sgd.yaml"
    with pytest.raises(ConfigError, match=r"study 'sp' was made with another search space: "
                                          r".*search_sgd.yaml adds optim.name, optim.nesterov; changes schedule.max_lr;"):
        search_study.open_study(load_search(sgd), storage, "sp")


def _ask_at_once(url: str, name: str, barrier, numbers) -> None:
    study = optuna.load_study(study_name=name, storage=search_study.open_storage(url))
    barrier.wait()
    numbers.put(study.ask().number)


def test_two_workers_asking_at_once_never_both_get_the_queued_trial(tmp_path):
    """SQLite: a queued trial (the incumbent, a retry) goes to one worker only. Without
    BEGIN IMMEDIATE both read it WAITING and both ran it (9 rounds in 10 when asking at once)."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    storage = search_study.open_storage(url)
    fork = multiprocessing.get_context("fork")  # only Optuna and SQLAlchemy run in the children
    for round_ in range(12):
        optuna.create_study(study_name=f"r{round_}", storage=storage).enqueue_trial({"x": 1.0})
        barrier, numbers = fork.Barrier(2), fork.Queue()
        workers = [fork.Process(target=_ask_at_once, args=(url, f"r{round_}", barrier, numbers))
                   for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert [w.exitcode for w in workers] == [0, 0]
        assert sorted([numbers.get(timeout=5), numbers.get(timeout=5)]) == [0, 1], f"round {round_}"
