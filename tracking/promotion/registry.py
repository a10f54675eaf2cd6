"""Registers a promoted run in the Model Registry once, whoever else promotes it at that moment.

From whichever machine; tracking/promote.py decides which run."""

from __future__ import annotations

import contextlib
from typing import Optional

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from tracking.promotion.candidates import Candidate, PromotionError
from tracking.lifecycle.safe_model import MADE_BY
from tracking.lifecycle.shared_writes import retry


def versions_of_run(client: MlflowClient, name: str, run_id: str) -> list[ModelVersion]:
    """The run's versions under `name`, lowest number first."""
    found = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    return sorted(found, key=lambda v: int(v.version))


def find_version(client: MlflowClient, name: str, run_id: str) -> Optional[ModelVersion]:
    found = versions_of_run(client, name, run_id)
    return found[0] if found else None


class ForeignModel(PromotionError):
    """A registered model of that name exists and this project did not create it."""


def ensure_registered_model(client: MlflowClient, name: str, max_params: Optional[int] = None) -> None:
    """Creates `name` tagged as ours (in the same call, so no one sees it untagged), or checks
    that the existing one is ours: another team's model is never taken over."""
    budget = f", <= {max_params:,} parameters" if max_params is not None else ""
    try:
        client.create_registered_model(
            name, tags=dict([MADE_BY]), description=f"MNIST CNN{budget}; input float32 raw pixels "
                                                    "0-255 (N, 1, 28, 28), output (N, 10) logits")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        check_ours(client, name)


def check_ours(client: MlflowClient, name: str) -> None:
    """ForeignModel if a registered model `name` exists without our tag; nothing if none exists."""
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise
    if model.tags.get(MADE_BY[0]) != MADE_BY[1]:
        raise ForeignModel(f"registered model {name!r} exists and was not created by this project "
                           f"(no tag {MADE_BY[0]}={MADE_BY[1]}): choose another --model-name "
                           "(or set that tag on it if it is yours)")


def version_tags(cand: Candidate) -> dict[str, str]:
    h = cand.hold
    return {"run_id": cand.run_id, "hold_epochs": str(h.hold_epochs),
            "best_test_accuracy": str(h.best_accuracy), "held_test_accuracy": str(h.held_accuracy),
            "num_params": str(cand.num_params)}


def complete(client: MlflowClient, name: str, version: ModelVersion, cand: Candidate,
             alias: str) -> None:
    """Writes the tags a version lacks (one made by a promoter killed before writing them)
    and points `alias` at it; tags it has are kept (a rerun's --target may differ)."""
    for key, value in version_tags(cand).items():
        if key not in version.tags:
            idempotent(client.set_model_version_tag, name, version.version, key, value)
    idempotent(client.set_registered_model_alias, name, alias, version.version)


def idempotent(call, *args, attempts: int = 4):
    """A registry write that another promoter may make at the same moment (the same alias or
    tag): the two inserts race in the server's database and the loser gets an error although
    the row now exists. Writing it again updates it. A refused value is not retried."""
    return retry(lambda: call(*args), attempts=attempts, wait=lambda attempt: 0.2 * attempt,
                 on=lambda exc: isinstance(exc, MlflowException)
                 and exc.error_code != "INVALID_PARAMETER_VALUE")


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
    # with its tags in one call: a kill right after leaves no untagged version
    mine = client.create_model_version(name, source=cand.model_uri, run_id=cand.run_id,
                                       model_id=model_id, tags=version_tags(cand))
    try:
        kept = versions_of_run(client, name, cand.run_id)[0]  # ours is listed: never empty
        if str(kept.version) != str(mine.version):
            client.delete_model_version(name, mine.version)  # an earlier promoter won
        complete(client, name, kept, cand, alias)
    except BaseException:
        with contextlib.suppress(MlflowException):  # already gone if we lost the race
            client.delete_model_version(name, mine.version)  # never leave a half-registered one
        raise
    return kept, str(kept.version) == str(mine.version)
