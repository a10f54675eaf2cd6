"""The search file (experiments/search.yaml): a run config plus `search:` settings and a `space:`.

Parameter names are dotted config paths (``optim.lr``), the names runs log as params, so a
trial's params map straight back onto a RunConfig with `config.replace`. Everything is
checked when the file is read: unknown paths, bad distributions, ranges the config would
refuse, conditions on parameters not yet sampled. A search never starts on a bad file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any, Optional

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from mnist_mlflow import config as C
from mnist_mlflow.config import ConfigError, require

# Paths a search must not vary, and why: trials are only comparable when these are equal.
FIXED_PATHS = {
    "model.max_params": "the parameter budget is the constraint, not a hyperparameter "
                        "(set it with search.max_params)",
    "seed": "searching the seed fits noise",
    "stage": "run plumbing", "device": "run plumbing", "study_data": "run plumbing",
}
FIXED_PREFIXES = {
    "data.": "every trial is scored on the same validation split",
    "target.": "the target is for reporting, not selection",
}
KINDS = ("float", "int", "categorical")
SAMPLERS = ("tpe", "gp", "random")  # search.sampler.name; tracking/search/sampling.py makes them
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched config path; it is sampled only while all its `when` conditions hold."""

    path: str
    distribution: Any  # an optuna distribution
    when: tuple[tuple[str, tuple], ...] = ()  # (config path, allowed values)

    def active(self, values: dict[str, Any]) -> bool:
        return all(values[p] in allowed for p, allowed in self.when)


@dataclasses.dataclass(frozen=True)
class Settings:
    n_trials: int = 30
    budget_minutes: Optional[float] = None  # no trial starts after it; None: no time limit
    hard_budget: bool = False  # true: running trials end at the budget too (the search ends by it)
    workers: int = 1  # local worker processes (--workers overrides)
    study_name: str = "mnist-search"
    storage: str = "sqlite:///optuna.db"
    max_params: int = 8000  # the hard budget: a trial over it never trains
    # The objective's threshold on validation accuracy is target.accuracy + val_margin:
    # validation images are scored against, not the test set.
    val_margin: float = 0.0
    fixed: tuple = ()  # config paths the space may not search (the assignment's fixed points)
    enqueue_base: bool = True  # a new study's first trial is the base config (the incumbent)
    log_models: bool = False  # a model per trial costs time and disk; the best is retrained
    sampler: dict = dataclasses.field(default_factory=lambda: {"seed": 0, "n_startup_trials": 10})
    pruner: dict = dataclasses.field(default_factory=lambda: {"name": "median"})
    # seeds: a promising trial's seeds in all (its objective is their mean); margin: how far
    # behind the best mean a first seed may score and still count as promising (objective units)
    race: dict = dataclasses.field(default_factory=lambda: {"seeds": 1, "margin": 0.0})
    # one seed's objective sd (docs/noise.md): confirm keeps the base unless a candidate beats
    # it by more than the noise of the runs screened; None: the top-ranked candidate wins
    hold_epoch_sd: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    base: C.RunConfig  # what every trial starts from
    space: tuple[Param, ...]
    settings: Settings
    source: str  # the file it came from
    extends: Optional[str] = None  # the experiment file it derives from (resolved path)

    @property
    def budget(self) -> int:
        return self.settings.max_params

    @property
    def threshold(self) -> float:
        """Validation accuracy a trial must hold, percent."""
        return self.base.target.accuracy + self.settings.val_margin

    @property
    def horizon(self) -> int:
        """The longest a trial can train (epochs): a trial that never holds ranks after it."""
        epochs = [self.base.optim.epochs]
        for p in self.space:
            if p.path == "optim.epochs":
                d = p.distribution
                epochs += list(d.choices) if isinstance(d, CategoricalDistribution) else [d.high]
        return int(max(epochs))


# ---------------------------------------------------------------- loading

def load_search(path: str | Path, overrides: dict[str, Any] | None = None,
                max_params: int | None = None) -> SearchSpec:
    """Reads a search file; `overrides` (dotted paths) apply to its run config part,
    `max_params` replaces search.max_params."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search file {str(path)!r} does not exist")
    raw = C.read_file(path)  # with the file it extends (experiments/stage3.yaml)
    extends = stage_file(path)
    # config.load refuses unknown top-level keys, so split ours off before it sees them.
    space_raw, settings_raw = raw.pop("space", None), raw.pop("search", None) or {}
    if max_params is not None:
        settings_raw = {**settings_raw, "max_params": max_params}
    settings = parse_settings(settings_raw)
    # The budget is the search's: every trial's model is built against it.
    base = C.from_dict(raw, {**(overrides or {}), "model.max_params": settings.max_params})
    if base.data.val_size <= 0:
        raise ConfigError(f"{path}: data.val_size={base.data.val_size}; trials are scored on a "
                          "validation split, so it must be > 0")
    if not space_raw or not isinstance(space_raw, dict):
        raise ConfigError(f"{path}: `space:` must be a non-empty mapping of config path -> "
                          "distribution")
    space = parse_space(space_raw, base, settings.fixed)
    # An override of a searched path fixes it: e.g. --epochs 2 for a quick look.
    fixed_now = set(overrides or {})
    space = tuple(p for p in space if p.path not in fixed_now)
    if not space:
        raise ConfigError(f"{path}: the overrides fix every searched path; nothing is left to search")
    return SearchSpec(base, space, settings, str(path), extends)


def stage_file(path: Path) -> Optional[str]:
    """The experiment file a search file derives from, through the search files it extends
    (search_sgd.yaml -> search.yaml -> stage3.yaml): what best_config.yaml extends."""
    parent = C.read_yaml(path).get(C.EXTENDS)
    while parent:  # read_file has refused cycles
        path = (path.parent / parent).resolve()
        raw = C.read_yaml(path)
        if not {"search", "space"} & set(raw):
            return str(path)
        parent = raw.get(C.EXTENDS)
    return None


def parse_settings(raw: dict[str, Any]) -> Settings:
    if not isinstance(raw, dict):
        raise ConfigError(f"search: must be a mapping, got {raw!r}")
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"unknown key 'search.{unknown[0]}'; allowed: "
                          f"{', '.join(sorted(fields))}")
    s = Settings(**{**dataclasses.asdict(Settings()), **raw})
    require(isinstance(s.n_trials, int) and s.n_trials > 0, "search.n_trials", s.n_trials,
            "an integer > 0")
    require(isinstance(s.max_params, int) and not isinstance(s.max_params, bool) and s.max_params > 0,
            "search.max_params", s.max_params, "an integer > 0")
    margin = s.val_margin
    require(isinstance(margin, (int, float)) and not isinstance(margin, bool) and math.isfinite(margin)
            and abs(margin) < 5, "search.val_margin", margin, "a number of percentage points, -5..5")
    require(isinstance(s.fixed, (list, tuple)) and all(isinstance(f, str) for f in s.fixed),
            "search.fixed", s.fixed, "a list of config paths")
    s = dataclasses.replace(s, val_margin=float(margin), fixed=tuple(s.fixed))
    require(isinstance(s.log_models, bool), "search.log_models", s.log_models, "true or false")
    require(isinstance(s.enqueue_base, bool), "search.enqueue_base", s.enqueue_base, "true or false")
    require(isinstance(s.hard_budget, bool), "search.hard_budget", s.hard_budget, "true or false")
    require(isinstance(s.sampler, dict) and set(s.sampler) <= {"name", "seed", "n_startup_trials"},
            "search.sampler", s.sampler, "a mapping with name, seed and/or n_startup_trials")
    require(s.sampler.get("name", "tpe") in SAMPLERS, "search.sampler.name", s.sampler.get("name"),
            " or ".join(SAMPLERS))
    require(s.budget_minutes is None or (isinstance(s.budget_minutes, (int, float))
            and not isinstance(s.budget_minutes, bool) and 0 < s.budget_minutes < math.inf),
            "search.budget_minutes", s.budget_minutes, "a number of minutes > 0, or null")
    require(isinstance(s.workers, int) and not isinstance(s.workers, bool) and s.workers >= 1,
            "search.workers", s.workers, "an integer >= 1")
    race = {"seeds": 1, "margin": 0.0, **(s.race if isinstance(s.race, dict) else {"?": s.race})}
    require(set(race) == {"seeds", "margin"}, "search.race", s.race, "a mapping with seeds and/or margin")
    require(isinstance(race["seeds"], int) and not isinstance(race["seeds"], bool)
            and 1 <= race["seeds"] <= 20, "search.race.seeds", race["seeds"], "an integer 1..20")
    require(isinstance(race["margin"], (int, float)) and not isinstance(race["margin"], bool)
            and 0 <= race["margin"] < math.inf, "search.race.margin", race["margin"],
            "a number >= 0 (objective units: epochs)")
    s = dataclasses.replace(s, race=race)
    sd = s.hold_epoch_sd
    require(sd is None or (isinstance(sd, (int, float)) and not isinstance(sd, bool) and 0 < sd < math.inf),
            "search.hold_epoch_sd", sd, "a number of epochs > 0, or null")
    make_pruner(s.pruner)  # fails here, not in the first trial
    return s


def parse_space(raw: dict[str, Any], base: C.RunConfig, fixed: tuple[str, ...] = ()) -> tuple[Param, ...]:
    """In file order: a condition may only name a parameter sampled before it."""
    known = C.flatten(base)
    for path in fixed:
        if path not in known:
            raise ConfigError(f"search.fixed: unknown config path {path!r}{_did_you_mean(path, known)}")
    params: list[Param] = []
    order = list(raw)
    for i, (path, spec) in enumerate(raw.items()):
        if path not in known:
            raise ConfigError(f"space: unknown config path {path!r}{_did_you_mean(path, known)}; "
                              f"allowed: {', '.join(known)}")
        reason = FIXED_PATHS.get(path) or next(
            (why for prefix, why in FIXED_PREFIXES.items() if path.startswith(prefix)), None) or (
            "the search file fixes it (search.fixed)" if path in fixed else None)
        if reason:
            raise ConfigError(f"space: {path!r} cannot be searched: {reason}")
        if not isinstance(spec, dict):
            raise ConfigError(f"space.{path} must be a mapping like {{type: float, low: 0, high: 1}}")
        spec = dict(spec)
        when = _parse_when(path, spec.pop("when", None) or {}, params, set(order[i:]), known)
        dist = _distribution(path, spec)
        _check_range(path, dist, base)
        params.append(Param(path, dist, when))
    return tuple(params)


def _did_you_mean(path: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(path, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _distribution(path: str, spec: dict[str, Any]):
    kind = spec.pop("type", None)
    require(kind in KINDS, f"space.{path}.type", kind, " | ".join(KINDS))
    allowed = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"},
               "categorical": {"choices"}}[kind]
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ConfigError(f"space.{path}: unknown key {extra[0]!r} for type {kind}; "
                          f"allowed: {', '.join(sorted(allowed | {'type', 'when'}))}")
    if kind == "categorical":
        choices = spec.get("choices")
        require(isinstance(choices, list) and len(choices) > 0, f"space.{path}.choices", choices,
                "a non-empty list")
        return CategoricalDistribution(choices)
    number = (int,) if kind == "int" else (int, float)
    for key in ("low", "high"):
        v = spec.get(key)
        require(isinstance(v, number) and not isinstance(v, bool), f"space.{path}.{key}", v,
                f"{'an integer' if kind == 'int' else 'a number'} (YAML reads 1e-3 as text: "
                "write 1.0e-3)")
    require(isinstance(spec.get("log", False), bool), f"space.{path}.log", spec.get("log"),
            "true or false")
    cls = IntDistribution if kind == "int" else FloatDistribution
    try:
        return cls(spec["low"], spec["high"], **{k: spec[k] for k in ("log", "step") if k in spec})
    except (TypeError, ValueError) as exc:  # optuna's checks: low <= high, log needs low > 0, ...
        raise ConfigError(f"space.{path}: {exc}") from exc


def _check_range(path: str, dist: Any, base: C.RunConfig) -> None:
    """Every end of the range must be a value the config itself accepts."""
    values = dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
    for v in values:
        try:
            C.replace(base, {path: v})
        except ConfigError as exc:
            raise ConfigError(f"space.{path} allows {v!r}, which the config refuses: {exc}") from exc


def _parse_when(path: str, when: dict[str, Any], earlier: list[Param], later: set[str],
                known: dict[str, Any]) -> tuple[tuple[str, tuple], ...]:
    """Conditions read values already decided: earlier parameters, or fixed base values."""
    if not isinstance(when, dict):
        raise ConfigError(f"space.{path}.when must map config paths to a value or a list of values")
    sampled = {p.path: p for p in earlier}
    out = []
    for cond, allowed in when.items():
        if cond not in known:
            raise ConfigError(f"space.{path}.when: unknown config path {cond!r}"
                              f"{_did_you_mean(cond, known)}")
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        prior = sampled.get(cond)
        if cond in later:
            raise ConfigError(f"space.{path}.when names {cond!r}, which is sampled at or after "
                              "it; list it earlier in the file")
        if prior is not None and isinstance(prior.distribution, CategoricalDistribution):
            bad = [a for a in allowed if a not in prior.distribution.choices]
            if bad:
                raise ConfigError(f"space.{path}.when: {cond}={bad[0]!r} is never sampled; "
                                  f"choices are {list(prior.distribution.choices)}")
        out.append((cond, allowed))
    return tuple(out)


def make_pruner(spec: dict[str, Any]) -> optuna.pruners.BasePruner:
    """``{name: median, n_startup_trials: 5, n_warmup_steps: 5}``: steps are epochs, from 1."""
    if not isinstance(spec, dict) or spec.get("name") not in PRUNERS:
        raise ConfigError(f"search.pruner={spec!r} is not allowed: a mapping whose name is one of "
                          f"{', '.join(PRUNERS)}")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    try:
        return PRUNERS[spec["name"]](**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"search.pruner ({spec['name']}): {exc}") from exc
