"""Which run may be promoted: the criteria, and the scan for the first run that meets them.

The criteria are the experiment file's target and budget (promotion enforces the budget)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Run

from mnist_mlflow import config as C
from mnist_mlflow.evaluation import HoldSummary, hold_summary
from mnist_mlflow.models import count_params
from tracking import cli
from tracking.lifecycle.run_logging import MODEL_NAME
from tracking.lifecycle.safe_model import MADE_BY, Unverifiable, load_verified, rebuild
from tracking.search.names import PARENT_TAG

METRIC = "test_accuracy"
CANDIDATE_TAG, CHAMPION_TAG = "confirm_candidate", "champion"  # on confirm's final runs, its parent
CLOSEST_SHOWN = 5


class PromotionError(RuntimeError):
    exit_code = 2


class NoCandidate(PromotionError):
    exit_code = 1


class AccuracyMismatch(PromotionError):
    exit_code = 3


@dataclass(frozen=True)
class Criteria:
    """What a run must have done to be promoted: held `target`% test accuracy for `hold`
    epochs, with at most `max_params` parameters (None: no budget)."""

    target: float
    hold: int
    max_params: Optional[int]

    @classmethod
    def of(cls, config: str | Path = cli.STAGE3, target: Optional[float] = None,
           hold: Optional[int] = None) -> "Criteria":
        """The experiment file's target and budget; `target` and `hold` override its target."""
        cfg = C.load(config)
        return cls(cfg.target.accuracy if target is None else target,
                   cfg.target.hold if hold is None else hold, cfg.model.max_params)

    def over_budget(self, n: int) -> bool:
        return self.max_params is not None and n > self.max_params


@dataclass
class Candidate:
    """One scanned run; `reason` says why it does not qualify (empty when it does)."""

    run: Run
    hold: HoldSummary
    last_accuracy: float
    model_uri: Optional[str] = None  # models:/<model_id> of the logged model
    model: Optional[torch.nn.Module] = None
    num_params: Optional[int] = None
    reason: str = ""
    unverifiable: bool = False  # skipped as not shown to be this project's model

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


def finished_runs(client: MlflowClient, exp_ids: list[str], parent_run_id: Optional[str] = None,
                  candidate: Optional[str] = None) -> Iterator[Run]:
    """Oldest first, page by page: the first qualifying run is often early (mlflow.search_runs
    would read every page before the first run is looked at). `candidate`: only the children
    tagged confirm_candidate=`candidate` (ids and names checked by the caller)."""
    token = None
    where = "attributes.status = 'FINISHED'"
    if parent_run_id:
        where += f" AND tags.`{PARENT_TAG}` = '{parent_run_id}'"
    if candidate:  # its final runs; its screening runs log no model
        where += f" AND tags.`{CANDIDATE_TAG}` = '{candidate}' AND tags.confirm_role = 'final'"
    while True:
        page = client.search_runs(exp_ids, where,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def accuracy_history(client: MlflowClient, run_id: str) -> list[float]:
    """One value per step (epoch), in step order; a re-logged step keeps its latest value."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, METRIC):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [by_step[s][1] for s in sorted(by_step)]


def logged_model_uri(client: MlflowClient, run: Run) -> Optional[str]:
    models = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{MODEL_NAME}'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    if not ready:
        return None
    return max(ready, key=lambda m: m.creation_timestamp).model_uri


def param_int(run: Run, key: str) -> Optional[int]:
    """A logged int param; None when absent or logged as None."""
    raw = run.data.params.get(key)
    if raw in (None, "", "None"):
        return None
    try:
        return int(raw)
    except ValueError:
        raise PromotionError(f"run {run.info.run_id}: param {key}={raw!r} is not an integer") from None


def qualify(client: MlflowClient, cand: Candidate, crit: Criteria) -> Candidate:
    """Fills `reason` (cheapest checks first) and, for a qualifying run, the verified model.
    Nothing from the store is executed: see tracking/lifecycle/safe_model.py."""
    h = cand.hold
    if h.target_reached_epoch is None:
        cand.reason = f"needs {crit.hold} consecutive epochs >= {crit.target}%"
        return cand
    try:
        if cand.run.data.tags.get(MADE_BY[0]) != MADE_BY[1]:
            raise Unverifiable(f"not logged by this project (no tag {MADE_BY[0]}={MADE_BY[1]})")
        net = rebuild(cand.run)
        cand.num_params = count_params(net)  # the loaded weights must fit this network exactly
        if crit.over_budget(cand.num_params):
            cand.reason = f"logged model has {cand.num_params:,} parameters > {crit.max_params:,}"
            return cand
        cand.model_uri = logged_model_uri(client, cand.run)
        if cand.model_uri is None:
            cand.reason = f"no READY logged model named {MODEL_NAME!r}"
            return cand
        cand.model = load_verified(client, cand.model_uri, net)
    except Unverifiable as exc:
        cand.reason, cand.unverifiable = f"cannot be verified: {exc}", True
    return cand


def select_run(client: MlflowClient, exp_ids: list[str], crit: Criteria,
               parent_run_id: Optional[str] = None,
               on_skip: Callable[[str], None] = lambda line: None,
               candidate: Optional[str] = None,
               ) -> tuple[Optional[Candidate], list[Candidate]]:
    """(first qualifying candidate or None, the rejected ones scanned before it); `on_skip`
    gets one line for each run that held the target but could not be verified."""
    rejected: list[Candidate] = []
    for run in finished_runs(client, exp_ids, parent_run_id, candidate):
        history = accuracy_history(client, run.info.run_id)
        if not history:
            continue  # not a training run (a search parent, a benchmark without test metric)
        cand = qualify(client, Candidate(run, hold_summary(history, crit.target, crit.hold),
                                       history[-1]), crit)
        if not cand.reason:
            return cand, rejected
        if cand.unverifiable:
            on_skip(f"skipped run {cand.run_id} ({run.info.run_name}): {cand.reason}")
        rejected.append(cand)
    return None, rejected


def no_candidate_message(rejected: list[Candidate], crit: Criteria, scope: str) -> str:
    budget = f" of <= {crit.max_params:,} parameters" if crit.max_params is not None else ""
    head = (f"no FINISHED run in {scope} held {METRIC} >= {crit.target}% for {crit.hold} "
            f"consecutive epochs with a logged model{budget}")
    if not rejected:
        return head + f"; no run there has a {METRIC} history"
    closest = sorted(rejected, key=lambda c: (c.hold.hold_epochs, c.hold.best_accuracy),
                     reverse=True)[:CLOSEST_SHOWN]
    lines = [f"  run {c.run_id} ({c.run.info.run_name}): longest hold {c.hold.hold_epochs} "
             f"epochs, best {c.hold.best_accuracy:.2f}% - {c.reason}" for c in closest]
    return "\n".join([head + f". Closest of {len(rejected)} candidates:", *lines])
