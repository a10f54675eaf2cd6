"""What a trial tries: the space's parameters under their config paths, the base config, the sampler.

Each parameter is suggested under its config path; the base config is the first trial."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution

from mnist_mlflow import config as C
from tracking.search.space import Param, SearchSpec, Settings


def sample_params(trial: optuna.Trial, space: tuple[Param, ...], base: C.RunConfig) -> dict[str, Any]:
    """Suggests each active parameter under its config path; inactive ones keep the base value."""
    values = C.flatten(base)
    params: dict[str, Any] = {}
    for p in space:
        if not p.active(values):
            continue
        d = p.distribution
        if isinstance(d, CategoricalDistribution):
            v = trial.suggest_categorical(p.path, d.choices)
        elif isinstance(d, IntDistribution):
            v = trial.suggest_int(p.path, d.low, d.high, step=d.step, log=d.log)
        else:
            v = trial.suggest_float(p.path, d.low, d.high, step=d.step, log=d.log)
        params[p.path] = values[p.path] = v
    return params


def base_params(spec: SearchSpec) -> dict[str, Any]:
    """The base config as values of the space (clipped into ranges; a categorical that lacks
    the base's value is left to the sampler), for enqueueing it as the study's first trial."""
    values = C.flatten(C.resolved_widths(spec.base))  # the incumbent's actual widths
    out: dict[str, Any] = {}
    for p in spec.space:
        if not p.active(values):
            continue
        d, v = p.distribution, values[p.path]
        if isinstance(d, CategoricalDistribution):
            if v in d.choices:
                out[p.path] = v
        elif v is not None:
            out[p.path] = min(max(v, d.low), d.high)
    return out


def make_sampler(settings: Settings, seed: Optional[int]) -> optuna.samplers.BaseSampler:
    """search.sampler.name: multivariate TPE with `group` (conditional parameters modelled together;
    the default), Optuna's GPSampler (a Gaussian process, for few continuous dimensions), or random."""
    name = settings.sampler.get("name", "tpe")
    startup = settings.sampler.get("n_startup_trials", 10)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # `group`, GPSampler
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup,
                                             warn_independent_sampling=False)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=startup)
