"""Checks a search invocation before anything exists: what it asks for and what it will do.

`Options` is what it asks for, `Plan` what it will do: every check that needs no storage, run or
process is made here, so a bad file or flag fails before any exists."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from mnist_mlflow import config as C
from tracking import cli
from tracking.search.space import SearchSpec, load_search
from tracking.search.study import HEARTBEAT_S

DEFAULT_CONFIG = "experiments/search.yaml"
CONFIG_FLAGS = ("epochs", "train_limit", "test_limit")  # cli.OVERRIDES the search takes ("seed" is the sampler's)


@dataclass(frozen=True)
class Options:
    """The CLI's choices; None means "what the search file says"."""

    config: str = DEFAULT_CONFIG
    n_trials: Optional[int] = None
    epochs: Optional[int] = None
    storage: Optional[str] = None
    study_name: Optional[str] = None
    timeout: Optional[float] = None  # seconds; None: search.budget_minutes
    workers: Optional[int] = None  # None: search.workers
    sampler_seed: Optional[int] = None  # None: search.sampler.seed
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    experiment: str = ""
    overrides: tuple[str, ...] = ()  # --set items, key=value
    max_params: Optional[int] = None  # search.max_params
    study_trials: Optional[int] = None  # shared search: finished trials of the whole study
    heartbeat: Optional[int] = None  # seconds; None: HEARTBEAT_S
    budget_minutes: Optional[float] = None  # None: search.budget_minutes (--timeout wins)
    enqueue_base: Optional[bool] = None  # None: search.enqueue_base
    hard_budget: Optional[bool] = None  # None: search.hard_budget


@dataclass(frozen=True)
class Plan:
    """The search file with the CLI's choices applied; every value decided."""

    spec: SearchSpec
    n_trials: int  # this invocation's, over all its workers (unused in a shared search)
    storage: str
    study_name: str
    timeout: Optional[float]
    workers: int  # local worker processes
    sampler_seed: int
    study_trials: Optional[int]  # shared search: the study's finished trials to reach
    heartbeat: int
    experiment: str
    hard_budget: bool = False

    @property
    def shared(self) -> bool:
        """Several invocations, on any machines, make one study and one parent run."""
        return self.study_trials is not None


def timeout_of(opts: Options, file_minutes: Optional[float]) -> Optional[float]:
    """Seconds after which no trial starts: --timeout, else the budget in minutes."""
    if opts.timeout:
        return opts.timeout
    minutes = opts.budget_minutes or file_minutes
    return None if minutes is None else 60.0 * minutes


def resolve(opts: Options) -> Plan:
    spec = load_search(opts.config, cli.overrides(opts, CONFIG_FLAGS), max_params=opts.max_params)
    if opts.enqueue_base is not None:
        spec = dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, enqueue_base=opts.enqueue_base))
    s = spec.settings
    plan = Plan(spec, n_trials=opts.n_trials or s.n_trials, storage=opts.storage or s.storage,
                study_name=opts.study_name or s.study_name, timeout=timeout_of(opts, s.budget_minutes),
                workers=opts.workers or s.workers,
                sampler_seed=s.sampler.get("seed", 0) if opts.sampler_seed is None else opts.sampler_seed,
                study_trials=opts.study_trials, heartbeat=opts.heartbeat or HEARTBEAT_S,
                experiment=opts.experiment,
                hard_budget=s.hard_budget if opts.hard_budget is None else opts.hard_budget)
    if plan.workers < 1:
        raise C.ConfigError(f"--workers={plan.workers} is not allowed: 1 or more")
    if plan.hard_budget and plan.timeout is None:
        raise C.ConfigError("a hard budget (--hard-budget, search.hard_budget) ends running trials at "
                            "the time budget, and there is none: give --budget-minutes or --timeout "
                            "(the file's is null)")
    if plan.shared:
        if opts.n_trials is not None:
            raise C.ConfigError("give --n-trials (trials of this invocation) or --study-trials "
                                "(finished trials of the whole shared study), not both")
        if plan.storage.startswith("journal:"):
            raise C.ConfigError("--study-trials needs a database storage with heartbeats "
                                "(postgresql://... for several machines, sqlite:///... for one), "
                                f"not {plan.storage!r}")
        if os.environ.get("MLFLOW_RUN_ID"):
            raise C.ConfigError("--study-trials joins the study's own parent run: start shared "
                                "workers with python -m tracking.search, not inside `mlflow run`")
    return plan
