"""Optuna search under the 8,000-parameter budget, tracked in MLflow: ``python -m tracking.search``.

One invocation = one parent MLflow run that wraps `study.optimize`; every trial is a child run
(see tracking/search_objective.py for the trial states). With ``--workers K`` the parent run
stays in this process and K spawned worker processes optimize the same study, each with its
share of the trials; their child runs carry the parent's id in the `mlflow.parentRunId` tag,
which is all MLflow needs to nest them. The study lives in Optuna storage (SQLite by
default), so running the same command again resumes it: completed trials are kept and
never repeated, and a trial interrupted by Ctrl-C or SIGTERM is queued to run again first.

With ``--study-trials N`` the search is shared: the same command on several machines (one
PostgreSQL storage, one tracking server) joins one study and one parent run, and the workers
together finish exactly N trials, retrying those of a worker that died (tracking/search_shared.py).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import zlib
from dataclasses import dataclass, field
from typing import Optional

import mlflow
import optuna
import sqlalchemy.exc
from mlflow.entities import Param as MlflowParam
from mlflow.exceptions import MlflowException

from mnist_mlflow import config as C
from mnist_mlflow import threads as T
from mnist_mlflow.data import DataError, Mnist, load_mnist
from tracking import cli, dashboard, liveness, runs, search_report, search_shared, search_study
from tracking.search_objective import Objective, TrialContext
from tracking.search_space import SearchSpec, load_search, make_pruner, make_sampler
from tracking.search_study import (HEARTBEAT_S, open_storage, open_study, redact,
                                  requeue_interrupted, sampler_seed)
from tracking.signals import sigterm_as_interrupt

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
    timeout: Optional[float] = None
    workers: int = 1
    seed: Optional[int] = None
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    experiment: str = ""
    overrides: tuple[str, ...] = ()
    max_params: Optional[int] = None  # search.max_params
    study_trials: Optional[int] = None  # shared search: finished trials of the whole study
    heartbeat: Optional[int] = None  # seconds; None: HEARTBEAT_S


@dataclass(frozen=True)
class WorkerJob:
    """Everything one worker needs; picklable, so it crosses into a spawned process."""

    spec: SearchSpec
    storage: str
    study_name: str
    n_trials: Optional[int]  # this worker's share; None in a shared search
    timeout: Optional[float]
    sampler_seed: int
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    threads: Optional[int]  # what threads: auto means in a spawned worker (its share of the cores)
    quota: Optional[int] = None  # shared search: the study's finished trials to reach
    heartbeat: int = HEARTBEAT_S


@dataclass
class SearchResult:
    parent_run_id: str
    study: optuna.Study
    best: Optional[optuna.trial.FrozenTrial]
    counts: dict[str, int] = field(default_factory=dict)


def shares(n_trials: int, workers: int) -> list[int]:
    """Fixed shares give exactly n_trials; MaxTrialsCallback, checked only after a trial ends,
    lets concurrent workers overshoot."""
    return [n_trials // workers + (1 if i < n_trials % workers else 0) for i in range(workers)]


def optimize(job: WorkerJob, mnist: Mnist | None = None) -> None:
    """One worker's loop; a trial that raises is FAIL and the loop goes on (catch=Exception)."""
    study = optuna.load_study(study_name=job.study_name,
                              storage=open_storage(job.storage, job.heartbeat),
                              sampler=make_sampler(job.spec.settings, job.sampler_seed),
                              pruner=make_pruner(job.spec.settings.pruner))
    ctx = TrialContext(job.spec, job.study_name, job.parent_run_id, job.experiment_id,
                       mnist or load_mnist(job.spec.base.data.data_dir),
                       search_shared.worker_name(), job.quota)
    if job.quota is not None:
        search_shared.optimize_to_quota(study, Objective(ctx), job.quota, job.timeout,
                                        poll_s=min(5, job.heartbeat))
    else:
        study.optimize(Objective(ctx), n_trials=job.n_trials, timeout=job.timeout,
                       catch=(Exception,), gc_after_trial=True)


def worker_main(job: WorkerJob) -> None:
    """Entry point of a spawned worker process."""
    os.environ.pop("MLFLOW_RUN_ID", None)  # never adopt the parent run as our own
    T.pin_auto(job.threads)  # K workers share the free cores instead of fighting for them
    mlflow.set_tracking_uri(job.tracking_uri)
    mlflow.set_experiment(experiment_id=job.experiment_id)
    try:
        with sigterm_as_interrupt():
            optimize(job)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the trial is recorded; no traceback
        sys.exit(130)


def run_processes(jobs: list[WorkerJob]) -> None:
    """Spawn (not fork: torch and MLflow hold threads), wait, and stop them all on any exit."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker_main, args=(job,), name=f"search-worker-{i}")
             for i, job in enumerate(jobs)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    finally:
        for p in procs:  # on Ctrl-C/SIGTERM here: let each worker end its trial cleanly
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    failed = [f"{p.name} (exit {p.exitcode})" for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"search workers failed: {', '.join(failed)}")


# ---------------------------------------------------------------- the search

def resolve(opts: Options) -> tuple[SearchSpec, dict]:
    """The search file with the CLI's overrides; every check that needs no storage or run."""
    spec = load_search(opts.config, cli.overrides(opts, CONFIG_FLAGS), max_params=opts.max_params)
    s = spec.settings
    plan = {"n_trials": opts.n_trials or s.n_trials, "storage": opts.storage or s.storage,
            "study_name": opts.study_name or s.study_name, "timeout": opts.timeout,
            "workers": opts.workers,
            "seed": opts.seed if opts.seed is not None else s.sampler.get("seed", 0),
            "study_trials": opts.study_trials, "heartbeat": opts.heartbeat or HEARTBEAT_S}
    if plan["workers"] < 1:
        raise C.ConfigError(f"--workers={plan['workers']} is not allowed: 1 or more")
    if opts.study_trials is not None:
        if opts.n_trials is not None:
            raise C.ConfigError("give --n-trials (trials of this invocation) or --study-trials "
                                "(finished trials of the whole shared study), not both")
        if plan["storage"].startswith("journal:"):
            raise C.ConfigError("--study-trials needs a database storage with heartbeats "
                                "(postgresql://... for several machines, sqlite:///... for one), "
                                f"not {plan['storage']!r}")
        if os.environ.get("MLFLOW_RUN_ID"):
            raise C.ConfigError("--study-trials joins the study's own parent run: start shared "
                                "workers with python -m tracking.search, not inside `mlflow run`")
    return spec, plan


def run_search(opts: Options, mnist: Mnist | None = None) -> SearchResult:
    """Runs one invocation of the search; see the module docstring."""
    spec, plan = resolve(opts)
    if plan["study_trials"] is not None:
        return run_shared(opts, spec, plan, mnist)
    storage = open_storage(plan["storage"], plan["heartbeat"])
    study = open_study(spec, storage, plan["study_name"])
    mnist = mnist or load_mnist(spec.base.data.data_dir)  # fails now, not in every worker
    cli.use_experiment(opts.experiment)
    queued = requeue_interrupted(study)
    n_existing = len(study.get_trials(deepcopy=False))
    with runs.tracked_run(run_name=f"search-{plan['study_name']}",
                          tags=parent_tags(spec, plan)) as parent:
        log_search_params(spec, plan, queued, parent.info.run_id)
        jobs = make_jobs(spec, plan, parent.info.run_id, parent.info.experiment_id, n_existing)
        try:
            run_jobs(jobs, mnist)
        except BaseException:  # a failed worker or Ctrl-C: the parent still shows what was done
            summarize_quietly(spec, plan, storage, parent.info.run_id)
            raise
        study = optuna.load_study(study_name=plan["study_name"], storage=storage)
        best = search_report.log_summary(study, spec, parent.info.run_id)
    return SearchResult(parent.info.run_id, study, best, search_report.counts(study))


def run_shared(opts: Options, spec: SearchSpec, plan: dict, mnist: Mnist | None) -> SearchResult:
    """One worker of a shared search: joins the study and its parent run (see search_shared)."""
    storage = open_storage(plan["storage"], plan["heartbeat"])
    mnist = mnist or load_mnist(spec.base.data.data_dir)
    experiment_id = cli.use_experiment(opts.experiment)
    study, created = search_study.create_or_load(storage, plan["study_name"])
    search_study.check_settings(spec, study)
    if created:
        search_study.enqueue_base(spec, study)
    client = mlflow.MlflowClient()

    def create_parent() -> tuple[str, str]:
        run = client.create_run(experiment_id, run_name=f"search-{plan['study_name']}",
                                tags=parent_tags(spec, plan))
        log_search_params(spec, plan, [], run.info.run_id)  # the creator's settings
        return run.info.run_id, experiment_id

    parent_id, experiment_id = search_shared.join_parent(study, storage, created, create_parent)
    search_shared.check_parent(parent_id)
    mlflow.set_experiment(experiment_id=experiment_id)  # the parent's, whatever --experiment says
    client.update_run(parent_id, status="RUNNING")  # it may have ended before this worker joined
    jobs = make_jobs(spec, plan, parent_id, experiment_id, len(study.get_trials(deepcopy=False)))
    status = "FINISHED"
    # Every worker keeps the shared parent's heartbeat while it works: tracking.doctor closes
    # the parent only when none is left (say the worker that would end it was SIGKILLed).
    hb = liveness.Heartbeat(parent_id, shared=True).start()
    try:
        run_jobs(jobs, mnist)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        hb.stop()
        try:
            search_shared.end_parent(study, parent_id, status,
                                     lambda s: search_report.log_summary(s, spec, parent_id))
        except Exception as exc:  # noqa: BLE001 - never hide the search's own outcome
            print(f"warning: could not log the search summary: {exc!r}", file=sys.stderr)
    study = optuna.load_study(study_name=plan["study_name"], storage=storage)
    return SearchResult(parent_id, study, search_report.best_trial(study),
                        search_report.counts(study))


def run_jobs(jobs: list[WorkerJob], mnist: Mnist | None) -> None:
    if len(jobs) == 1:
        optimize(jobs[0], mnist)
    else:
        run_processes(jobs)


def parent_tags(spec: SearchSpec, plan: dict) -> dict[str, str]:
    return {"stage": spec.base.stage, "search_role": "parent",
            "optuna.study_name": plan["study_name"], "optuna.storage": redact(plan["storage"])}


def summarize_quietly(spec: SearchSpec, plan: dict, storage: optuna.storages.BaseStorage,
                      run_id: str) -> None:
    """The summary on the way out of an error: its own failure must not hide that error."""
    try:
        study = optuna.load_study(study_name=plan["study_name"], storage=storage)
        search_report.log_summary(study, spec, run_id)
    except Exception as exc:  # noqa: BLE001
        print(f"warning: could not log the search summary: {exc!r}", file=sys.stderr)


def worker_threads(setting: T.Threads, workers: int) -> int:
    """Threads of each of K local workers: an explicit count as given; auto: the cores free
    now (sampled once, before the workers start), split between them."""
    return int(setting) if setting != T.AUTO else max(1, T.resolve(T.AUTO) // workers)


def make_jobs(spec: SearchSpec, plan: dict, parent_run_id: str, experiment_id: str,
              n_existing: int) -> list[WorkerJob]:
    k, quota = plan["workers"], plan["study_trials"]
    # one worker trains in this process: each trial resolves its own threads
    threads = worker_threads(spec.base.threads, k) if k > 1 else None
    per_worker = [None] * k if quota is not None else shares(plan["n_trials"], k)
    # Workers on other machines share seed and history: this machine and process tell them apart.
    salt = zlib.crc32(search_shared.worker_name().encode()) if quota is not None else 0
    return [WorkerJob(spec, plan["storage"], plan["study_name"], n, plan["timeout"],
                      sampler_seed(plan["seed"], n_existing, i, salt), parent_run_id,
                      experiment_id, mlflow.get_tracking_uri(), threads, quota, plan["heartbeat"])
            for i, n in enumerate(per_worker) if n is None or n > 0]


def log_search_params(spec: SearchSpec, plan: dict, queued: list[int], run_id: str) -> None:
    # Prefixed: under `mlflow run` this run already holds the entry point's raw parameters.
    s = spec.settings
    client = mlflow.MlflowClient()
    params = {
        "search.config": spec.source, "search.study_name": plan["study_name"],
        "search.storage": redact(plan["storage"]), "search.n_trials": plan["n_trials"],
        "search.workers": plan["workers"], "search.seed": plan["seed"],
        "search.timeout": plan["timeout"], "search.epochs": spec.base.optim.epochs,
        "search.budget": spec.budget, "search.pruner": s.pruner,
        "search.objective": search_report.objective_text(spec), "search.val_margin": s.val_margin,
        "search.requeued_trials": queued}
    if plan["study_trials"] is not None:
        params.update({"search.study_trials": plan["study_trials"],
                       "search.heartbeat_s": plan["heartbeat"]})
        # per machine, not per search; and a shared search queues no Ctrl-C'd trial again
        del params["search.n_trials"], params["search.workers"], params["search.requeued_trials"]
    client.log_batch(run_id, params=[MlflowParam(k, str(v)) for k, v in params.items()])
    client.log_artifact(run_id, spec.source, "search")


# ---------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None) -> Options:
    p = cli.parser("python -m tracking.search", __doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="search file (default %(default)s)")
    cli.add(p, "--n-trials", int, 1, help="trials in this invocation (default: the file's)")
    cli.add(p, "--study-trials", int, 1,
            help="shared search: run, with every worker started with the same study and "
                 "storage, until the whole study has this many finished trials")
    cli.add(p, "--heartbeat", int, 1, help=f"seconds between a running trial's heartbeats in "
            f"database storage (default {HEARTBEAT_S}); a trial silent for 3 heartbeats is failed "
            "and retried")
    p.add_argument("--storage", default="", help="sqlite:///optuna.db (the file's default), "
                                                 "journal:<file>, or any SQLAlchemy URL")
    p.add_argument("--study-name", default="", help="Optuna study; same name + storage = resume")
    cli.add(p, "--timeout", float, 0, help="seconds after which no new trial starts")
    cli.add(p, "--workers", int, 1, help="local worker processes (default 1)")
    cli.add(p, "--seed", int, 0, help="sampler seed (default: the file's)")
    cli.add(p, "--max-params", int, 1, help="the hard parameter budget (default: the file's "
                                            "search.max_params, 8,000)")
    cli.add_overrides(p, *CONFIG_FLAGS, helps={"epochs": "optim.epochs of every trial (no longer searched)",
                                               "test_limit": "data.test_limit (reporting only)"},
                      set_help="run-config override for every trial, e.g. --set data.val_size=5000 "
                               "(repeatable; one argument may hold several, space-separated)")
    cli.add_experiment(p)
    a = p.parse_args(argv)
    return Options(
        config=a.config, n_trials=a.n_trials, epochs=a.epochs, storage=a.storage or None,
        study_name=a.study_name or None, timeout=a.timeout, workers=a.workers or 1, seed=a.seed,
        train_limit=a.train_limit, test_limit=a.test_limit, experiment=a.experiment,
        max_params=a.max_params, overrides=tuple(o for item in a.overrides for o in item.split()),
        study_trials=a.study_trials, heartbeat=a.heartbeat)


def print_result(r: SearchResult) -> None:
    c = r.counts
    print(f"study {r.study.study_name}: {c['complete']} complete, {c['pruned']} pruned, "
          f"{c['rejected']} rejected (over budget), {c['failed']} failed"
          + (f", {c['surplus']} surplus" if c["surplus"] else ""))
    if r.best is not None:
        held = r.best.user_attrs.get("val_hold_epoch")
        print(f"best trial {r.best.number}: objective {r.best.value:.3f} "
              + (f"(validation hold completed at epoch {held}) " if held else "(never held) ")
              + f"({r.best.user_attrs['num_params']:,} parameters)")
        for k, v in r.best.params.items():
            print(f"  {k} = {v}")
        print(f"best config: mlflow artifacts download -r {r.parent_run_id} "
              f"-a {search_report.BEST_CONFIG} -d .")
    print(f"parent run_id: {r.parent_run_id}")


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
        resolve(opts)  # a bad file or flag fails before any storage, run or process exists
    except (C.ConfigError, MlflowException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt():
            result = run_search(opts)
    except (C.ConfigError, DataError, MlflowException, sqlalchemy.exc.SQLAlchemyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume the study", file=sys.stderr)
        return 130
    print_result(result)
    print(dashboard.hint(resolve(opts)[1]["storage"]))  # the study's own view
    return 0


if __name__ == "__main__":
    sys.exit(main())
