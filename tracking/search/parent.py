"""The search's parent run, managed one way whether the search runs on one machine or many.

- **Which run**: under `mlflow run`, the entry point's own run (MLFLOW_RUN_ID). In a shared
  search (``--study-trials``), the run of the worker whose `create_study` succeeded (the
  database lets exactly one win); it stores the id in the study's user attributes, and the
  other workers, and those that join later, wait for it and nest their trials under it.
  Otherwise a new run for this invocation.
- **Owned**: every process working for it keeps its heartbeat (tracking/lifecycle/liveness.py); shared
  when other processes may own it too, so tracking.doctor closes it only when none is left.
- **Ended** on the way out, with the summary (report.py) and the status the run lifecycle
  decides (runs.owned), by a process that leaves no trial of the study running; while
  other workers of a shared search are still at it, it stays RUNNING and is not summarized.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator

import mlflow
import optuna
from mlflow.entities import Param as MlflowParam
from mlflow.entities import RunTag
from mlflow.tracking.context.registry import resolve_tags
from optuna.trial import TrialState

from mnist_mlflow import config as C
from tracking.lifecycle import runs
from tracking.search import names as N
from tracking.search import report
from tracking.search.plan import Plan
from tracking.search.study import redact
from tracking.search.workers import fail_stale_trials, tally
from tracking.lifecycle.shared_writes import retrying

JOIN_WAIT_S = 60  # how long a joining worker waits for the creator to record the parent run


def open_parent(plan: Plan, study: optuna.Study, storage: optuna.storages.BaseStorage, created: bool,
                experiment_id: str, queued: list[int]) -> tuple[str, str]:
    """(run id, experiment id) of the parent run (see the module docstring); it is RUNNING and
    its experiment is the active one, where in-process trials create their runs."""
    client = mlflow.MlflowClient()
    # mlflow.start_run would adopt it as a trial's run: like MLflow, take it out of the environment
    run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if run_id:
        experiment_id = client.get_run(run_id).info.experiment_id
        describe(run_id, plan, queued)
    elif plan.shared:
        run_id, experiment_id = join(study, storage, created,
                                     lambda: (create(plan, experiment_id, queued), experiment_id))
        check_parent(run_id)
    else:
        run_id = create(plan, experiment_id, queued)
    client.update_run(run_id, status="RUNNING")  # a shared one may have ended before we joined
    mlflow.set_experiment(experiment_id=experiment_id)  # the parent's, whatever --experiment says
    return run_id, experiment_id


def create(plan: Plan, experiment_id: str, queued: list[int]) -> str:
    # resolve_tags: the source, user and commit tags that mlflow.start_run adds
    run = mlflow.MlflowClient().create_run(experiment_id, run_name=run_name(plan), tags=resolve_tags())
    describe(run.info.run_id, plan, queued)
    return run.info.run_id


def run_name(plan: Plan) -> str:
    return f"search-{plan.study_name}"


def tags(plan: Plan) -> dict[str, str]:
    return {"stage": plan.spec.base.stage, N.ROLE: N.PARENT_ROLE, N.STUDY_TAG: plan.study_name,
            N.STORAGE_TAG: redact(plan.storage)}


def describe(run_id: str, plan: Plan, queued: list[int]) -> None:
    """Name, tags, the search's settings as params and its file, on the run that holds them."""
    spec, s = plan.spec, plan.spec.settings
    # Prefixed: under `mlflow run` this run already holds the entry point's raw parameters.
    params = {
        "search.config": spec.source, "search.study_name": plan.study_name,
        "search.storage": redact(plan.storage), "search.n_trials": plan.n_trials,
        "search.workers": plan.workers, "search.seed": plan.sampler_seed,
        "search.timeout": plan.timeout, "search.hard_budget": plan.hard_budget,
        "search.epochs": spec.base.optim.epochs,
        "search.budget": spec.budget, "search.pruner": s.pruner,
        "search.objective": report.objective_text(spec), "search.val_margin": s.val_margin,
        "search.requeued_trials": queued}
    if plan.shared:
        params.update({"search.study_trials": plan.study_trials, "search.heartbeat_s": plan.heartbeat})
        # per machine, not per search; and a shared search queues no Ctrl-C'd trial again
        del params["search.n_trials"], params["search.workers"], params["search.requeued_trials"]
    client = mlflow.MlflowClient()
    client.update_run(run_id, name=run_name(plan))
    client.log_batch(run_id, params=[MlflowParam(k, str(v)) for k, v in params.items()],
                     tags=[RunTag(k, v) for k, v in tags(plan).items()])
    client.log_artifact(run_id, spec.source, "search")


def join(study: optuna.Study, storage: optuna.storages.BaseStorage, created: bool,
         create_parent: Callable[[], tuple[str, str]]) -> tuple[str, str]:
    """(parent run id, experiment id) of a shared study's search; the creator makes the run."""
    if created:
        try:
            run_id, experiment_id = create_parent()
            study.set_user_attr(N.EXPERIMENT_ATTR, experiment_id)
            study.set_user_attr(N.PARENT_ATTR, run_id)  # last: joiners wait for this one
        except BaseException:
            # Without a parent no worker could join: give the name back for the next try.
            optuna.delete_study(study_name=study.study_name, storage=storage)
            raise
        return run_id, experiment_id
    deadline = time.monotonic() + JOIN_WAIT_S
    while True:
        attrs = study.user_attrs  # read from the storage each time
        if N.PARENT_ATTR in attrs:
            return attrs[N.PARENT_ATTR], attrs[N.EXPERIMENT_ATTR]
        if time.monotonic() > deadline:
            raise C.ConfigError(
                f"study {study.study_name!r} has no shared parent run after {JOIN_WAIT_S} s: it "
                "was started without --study-trials, or its first worker failed; use another "
                "--study-name")
        time.sleep(0.5)


def check_parent(run_id: str) -> None:
    """The parent must be on this worker's tracking server: same MLFLOW_TRACKING_URI everywhere."""
    try:
        mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException as exc:
        raise C.ConfigError(
            f"the study's parent run {run_id} is not on {mlflow.get_tracking_uri()}: point "
            "MLFLOW_TRACKING_URI at the tracking server the first worker used") from exc


@contextlib.contextmanager
def owned(plan: Plan, storage: optuna.storages.BaseStorage, run_id: str) -> Iterator[None]:
    """This process works for the parent run while inside; on the way out it logs the summary
    and ends the run (see the module docstring). A failure of either on the way out of an
    error is a warning: it must not hide that error."""
    end, summarized = runs.RunEnd(), False
    try:
        with runs.owned(run_id, end, shared=plan.shared):
            yield
            summarized = True  # a failing summary fails the run, and is not tried again
            if last_out(plan, storage):
                log_study_summary(plan, storage, run_id)
    except BaseException:
        if not summarized:
            quietly("log the search summary",
                    lambda: last_out(plan, storage) and log_study_summary(plan, storage, run_id))
        quietly("end the parent run", lambda: end_parent(plan, storage, run_id, end.status))
        raise
    end_parent(plan, storage, run_id, end.status)


def log_study_summary(plan: Plan, storage: optuna.storages.BaseStorage, run_id: str) -> None:
    # retrying: two workers of a shared search that finish together both write it
    retrying(lambda: report.log_summary(load(plan, storage), plan.spec, run_id))


def quietly(what: str, call: Callable[[], object]) -> None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - reported; the error on its way out matters more
        print(f"warning: could not {what}: {exc!r}", file=sys.stderr)


def load(plan: Plan, storage: optuna.storages.BaseStorage) -> optuna.Study:
    return optuna.load_study(study_name=plan.study_name, storage=storage)


def last_out(plan: Plan, storage: optuna.storages.BaseStorage) -> bool:
    """No trial of the study runs elsewhere: this process summarizes and ends the parent. (A
    worker summarizing while another's trial runs could name a best trial that is overtaken.)"""
    if not plan.shared:
        return True
    study = load(plan, storage)
    fail_stale_trials(study)  # a dead worker's trial does not keep the parent open
    return not tally(study)[TrialState.RUNNING]


def end_parent(plan: Plan, storage: optuna.storages.BaseStorage, run_id: str, status: str) -> bool:
    """Ends the run with `status` unless trials of the shared study still run elsewhere.

    Returns whether it ended the run.
    """
    if not last_out(plan, storage):
        return False
    mlflow.MlflowClient().set_terminated(run_id, status)
    return True
