"""Promotes the first run that held the target to the Model Registry as ``<name>@champion``.

    python -m tracking.promote [--model-name mnist-8k] [--config experiments/stage3.yaml]
                               [--target PERCENT] [--hold EPOCHS] [--experiment NAME]
                               [--parent-run-id ID] [--dry-run]

"First" is by start time over FINISHED runs (stage runs and search trials alike) that
have a logged model named "model" and a ``test_accuracy`` history; with ``--parent-run-id``
only the children of that run (e.g. tracking.confirm's final runs). Before anything is
registered the logged model is loaded, its real parameter count checked against the
budget, and its test accuracy recomputed; a disagreement with the run's last logged value
refuses the promotion. Target, hold and budget are the experiment file's (`--config`:
target.accuracy, target.hold, model.max_params); --target and --hold override the first two.

Exit codes: 0 promoted, already promoted or dry run; 1 no qualifying run;
2 bad arguments or an unreachable store; 3 refused (logged accuracy disagrees).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
import math
import re
import sys
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from mnist_mlflow import config as C
from mnist_mlflow.data import DataError, Mnist, load_mnist
from mnist_mlflow.evaluation import HoldSummary, hold_summary
from mnist_mlflow.models import count_params
from mnist_mlflow.train import evaluate
from tracking import cli
from tracking.run_logging import MODEL_NAME

DEFAULT_MODEL_NAME = "mnist-8k"
ALIAS = "champion"
METRIC = "test_accuracy"
TOLERANCE = 0.05  # percentage points between the logged and the recomputed accuracy
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

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


@dataclass(frozen=True)
class PromotionResult:
    model_name: str
    version: Optional[str]  # None only for a dry run that would register a new version
    run_id: str
    model_uri: str
    created: bool  # False: the run was already registered (or dry run)
    dry_run: bool
    num_params: int
    hold_epochs: int
    best_test_accuracy: float
    held_test_accuracy: float
    logged_test_accuracy: float  # the run's last logged value
    verified_test_accuracy: Optional[float]  # None when an existing version was reused

    def describe(self) -> str:
        what = (f"would register run {self.run_id}" if self.dry_run and self.version is None else
                f"run {self.run_id} is {self.model_name} version {self.version}")
        verb = "promoted" if self.created else ("dry run" if self.dry_run else "already promoted")
        checked = ("" if self.verified_test_accuracy is None else
                   f", re-evaluated {self.verified_test_accuracy:.2f}%")
        return (f"{verb}: {what} (@{ALIAS})\n"
                f"  longest hold {self.hold_epochs} epochs, held {self.held_test_accuracy:.2f}%, "
                f"best {self.best_test_accuracy:.2f}%, last logged {self.logged_test_accuracy:.2f}%"
                f"{checked}, {self.num_params:,} parameters\n"
                f"  load with: models:/{self.model_name}@{ALIAS}")


# ---------------------------------------------------------------- arguments

def check_arguments(model_name: str, target: float, hold: int,
                    parent_run_id: Optional[str] = None) -> None:
    if not model_name.strip() or any(c in model_name for c in "'\"%/"):
        raise PromotionError(f"--model-name {model_name!r} is not allowed: a non-empty name "
                             "without quotes, % or /")
    if not (isinstance(target, (int, float)) and 0 < target <= 100):
        raise PromotionError(f"--target {target!r} is not allowed: 0 < target <= 100 (percent)")
    if not (isinstance(hold, int) and hold > 0):
        raise PromotionError(f"--hold {hold!r} is not allowed: a positive number of epochs")
    if parent_run_id and not re.fullmatch(r"[0-9a-zA-Z_-]+", parent_run_id):
        raise PromotionError(f"--parent-run-id {parent_run_id!r} is not allowed: a run id")


def experiment_ids(client: MlflowClient, name: Optional[str]) -> list[str]:
    if name:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise PromotionError(f"--experiment {name!r} does not exist; experiments: {known}")
        return [exp.experiment_id]
    return [e.experiment_id for e in client.search_experiments()]


# ---------------------------------------------------------------- scanning

def finished_runs(client: MlflowClient, exp_ids: list[str],
                  parent_run_id: Optional[str] = None) -> Iterator[Run]:
    """Oldest first, page by page: the first qualifying run is often early."""
    token = None
    where = "attributes.status = 'FINISHED'"
    if parent_run_id:
        where += f" AND tags.`mlflow.parentRunId` = '{parent_run_id}'"
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


def judge(client: MlflowClient, cand: Candidate, crit: Criteria) -> Candidate:
    """Fills `reason` (cheapest checks first) and, for a qualifying run, the loaded model."""
    h = cand.hold
    if h.target_reached_epoch is None:
        cand.reason = f"needs {crit.hold} consecutive epochs >= {crit.target}%"
        return cand
    logged_params = param_int(cand.run, "num_params")
    if logged_params is not None and crit.over_budget(logged_params):
        cand.reason = f"num_params param {logged_params:,} > {crit.max_params:,}"
        return cand
    cand.model_uri = logged_model_uri(client, cand.run)
    if cand.model_uri is None:
        cand.reason = f"no READY logged model named {MODEL_NAME!r}"
        return cand
    # The param could be stale or wrong; the weights that would be served are what count.
    try:
        cand.model = mlflow.pytorch.load_model(cand.model_uri, map_location="cpu")
    except (MlflowException, OSError) as exc:  # e.g. artifacts deleted: skip, don't crash
        cand.reason = f"logged model cannot be loaded ({exc})"
        return cand
    cand.num_params = count_params(cand.model)
    if crit.over_budget(cand.num_params):
        cand.reason = f"logged model has {cand.num_params:,} parameters > {crit.max_params:,}"
        cand.model = None
    return cand


def select_run(client: MlflowClient, exp_ids: list[str], crit: Criteria,
               parent_run_id: Optional[str] = None) -> tuple[Optional[Candidate], list[Candidate]]:
    """(first qualifying candidate or None, the rejected ones scanned before it)."""
    rejected: list[Candidate] = []
    for run in finished_runs(client, exp_ids, parent_run_id):
        history = accuracy_history(client, run.info.run_id)
        if not history:
            continue  # not a training run (a search parent, a benchmark without test metric)
        cand = judge(client, Candidate(run, hold_summary(history, crit.target, crit.hold),
                                       history[-1]), crit)
        if not cand.reason:
            return cand, rejected
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


# ---------------------------------------------------------------- verification

def verify_accuracy(cand: Candidate, mnist: Optional[Mnist]) -> float:
    """Recomputes test accuracy on the same test images the run used (its data.test_limit)."""
    if mnist is None:
        data_dir = cand.run.data.params.get("data.data_dir")
        mnist = load_mnist(None if data_dir in (None, "", "None") else data_dir)
    limit = param_int(cand.run, "data.test_limit")
    x, y = mnist.test_x[:limit], mnist.test_y[:limit]
    _, acc = evaluate(cand.model, torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y))
    if not math.isclose(acc, cand.last_accuracy, abs_tol=TOLERANCE):
        raise AccuracyMismatch(
            f"refusing to promote run {cand.run_id}: its logged model scores {acc:.2f}% on the "
            f"{len(y):,} test images, but the run's last logged {METRIC} is "
            f"{cand.last_accuracy:.2f}% (allowed difference {TOLERANCE} points); the metric or "
            "the model was changed after training")
    return acc


# ---------------------------------------------------------------- registering

def versions_of_run(client: MlflowClient, name: str, run_id: str) -> list[ModelVersion]:
    """The run's versions under `name`, lowest number first."""
    found = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    return sorted(found, key=lambda v: int(v.version))


def find_version(client: MlflowClient, name: str, run_id: str) -> Optional[ModelVersion]:
    found = versions_of_run(client, name, run_id)
    return found[0] if found else None


def ensure_registered_model(client: MlflowClient, name: str, max_params: Optional[int] = None) -> None:
    budget = f", <= {max_params:,} parameters" if max_params is not None else ""
    try:
        client.create_registered_model(
            name, description=f"MNIST CNN{budget}; input float32 raw pixels 0-255 "
                              "(N, 1, 28, 28), output (N, 10) logits")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def idempotent(call, *args, attempts: int = 4):
    """A registry write that another promoter may make at the same moment (the same alias or
    tag): the two inserts race in the server's database and the loser gets an error although
    the row now exists. Writing it again updates it. A refused value is not retried."""
    for attempt in range(attempts):
        try:
            return call(*args)
        except MlflowException as exc:
            if exc.error_code == "INVALID_PARAMETER_VALUE" or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def register(client: MlflowClient, name: str, cand: Candidate, alias: str,
             max_params: Optional[int] = None) -> tuple[ModelVersion, bool]:
    """Registers the run once, whoever else promotes it at the same moment, from any machine.

    The registry has no compare-and-set and numbers versions max + 1, so two promoters can
    both create a version. Each one therefore creates its version, then lists the run's
    versions and keeps the lowest, deleting its own if that is not the lowest: every promoter
    converges on the same version, and each sets the same tags and alias on it. Returns
    (the kept version, whether it is this call's). A failure before the alias is set deletes
    this call's version again.
    """
    ensure_registered_model(client, name, max_params)
    model_id = cand.model_uri.removeprefix("models:/")
    mine = client.create_model_version(name, source=cand.model_uri, run_id=cand.run_id,
                                       model_id=model_id)
    h = cand.hold
    tags = {"run_id": cand.run_id, "hold_epochs": h.hold_epochs,
            "best_test_accuracy": h.best_accuracy, "held_test_accuracy": h.held_accuracy,
            "num_params": cand.num_params}
    try:
        kept = versions_of_run(client, name, cand.run_id)[0]  # ours is listed: never empty
        if str(kept.version) != str(mine.version):
            client.delete_model_version(name, mine.version)  # an earlier promoter won
        for key, value in tags.items():
            idempotent(client.set_model_version_tag, name, kept.version, key, str(value))
        idempotent(client.set_registered_model_alias, name, alias, kept.version)
    except BaseException:
        with contextlib.suppress(MlflowException):  # already gone if we lost the race
            client.delete_model_version(name, mine.version)  # never leave a half-registered one
        raise
    return kept, str(kept.version) == str(mine.version)


def result_of(name: str, cand: Candidate, version: Optional[str | int], created: bool, dry_run: bool,
              verified: Optional[float]) -> PromotionResult:
    h = cand.hold
    version = None if version is None else str(version)  # the store answers int or str
    return PromotionResult(name, version, cand.run_id, cand.model_uri, created, dry_run,
                           cand.num_params, h.hold_epochs, h.best_accuracy, h.held_accuracy,
                           cand.last_accuracy, verified)


def promote(model_name: str = DEFAULT_MODEL_NAME, target: Optional[float] = None,
            hold: Optional[int] = None, experiment: Optional[str] = None, dry_run: bool = False, *,
            alias: str = ALIAS, mnist: Optional[Mnist] = None, parent_run_id: Optional[str] = None,
            config: str | Path = cli.STAGE3) -> PromotionResult:
    """Registers the first qualifying run under `model_name` and points `alias` at it.

    Uses the current tracking URI. Raises NoCandidate, AccuracyMismatch, PromotionError or
    ConfigError (the experiment file).
    """
    crit = Criteria.of(config, target, hold)
    check_arguments(model_name, crit.target, crit.hold, parent_run_id)
    client = MlflowClient()
    if parent_run_id:
        client.get_run(parent_run_id)  # an unknown id fails here (exit 2), not as "no candidate"
    cand, rejected = select_run(client, experiment_ids(client, experiment), crit, parent_run_id)
    if cand is None:
        scope = f"experiment {experiment!r}" if experiment else "any experiment"
        if parent_run_id:
            scope += f" under run {parent_run_id}"
        raise NoCandidate(no_candidate_message(rejected, crit, scope))
    existing = find_version(client, model_name, cand.run_id)
    # An existing version was verified when it was registered; a new one must be now.
    verified = None if existing else verify_accuracy(cand, mnist)
    if dry_run:
        return result_of(model_name, cand, existing and existing.version, False, True, verified)
    existing = find_version(client, model_name, cand.run_id)  # another promoter may have won
    if existing:
        idempotent(client.set_registered_model_alias, model_name, alias, existing.version)
        return result_of(model_name, cand, existing.version, False, False, verified)
    version, created = register(client, model_name, cand, alias, crit.max_params)
    return result_of(model_name, cand, version.version, created, False, verified)


# ---------------------------------------------------------------- CLI

def parser() -> cli.Parser:
    p = cli.parser("python -m tracking.promote", __doc__)
    p.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    p.add_argument("--config", default=str(cli.STAGE3),
                   help="experiment file whose target and budget apply (default %(default)s)")
    cli.add(p, "--target", float, help="test accuracy in percent (default: the file's target.accuracy)")
    cli.add(p, "--hold", int, help="consecutive epochs at or above target (default: target.hold)")
    p.add_argument("--experiment", default="", help="experiment name (default: all experiments)")
    p.add_argument("--parent-run-id", default="", help="only the child runs of this run "
                                                       "(e.g. tracking.confirm's parent)")
    # A value is accepted too so that the MLproject entry point can pass dry_run=false.
    p.add_argument("--dry-run", nargs="?", const="true", default="false", type=cli.typed("dry-run", bool),
                   help="report what would be promoted, register nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        cli.check_server()
        result = promote(args.model_name, args.target, args.hold, args.experiment or None,
                         bool(args.dry_run), parent_run_id=args.parent_run_id or None,
                         config=args.config)
    except PromotionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (C.ConfigError, MlflowException, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
