"""The MLflow runs of a search's trials: found, tagged with the trial's state, ended once.

Found by trial number under the parent run; stubbed for a trial that never trained."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import mlflow
from mlflow.entities import Param as MlflowParam

from tracking.search import names as N

log = logging.getLogger(__name__)


@dataclass
class TrialRuns:
    """The child runs of one search's parent run, found by trial number."""

    parent_run_id: str
    experiment_id: str
    study_name: str
    stage: str
    worker: str = ""

    @property
    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient()

    def tags(self, number: int, state: str, retry: Optional[int] = None) -> dict[str, str]:
        tags = {N.TRIAL_STATE: state, N.PARENT_TAG: self.parent_run_id,
                N.STUDY_TAG: self.study_name, N.TRIAL_NUMBER_TAG: str(number),
                N.ROLE: N.TRIAL_ROLE}
        if self.worker:
            tags[N.WORKER_TAG] = self.worker
        if retry is not None:
            tags[N.RETRY_OF_TAG] = str(retry)
        return tags

    def close(self, number: int, state: str, status: str | None, tags: dict[str, str],
              retry: Optional[int] = None) -> str | None:
        """Tags the trial's run and ends it with `status`; makes a stub run if it has none.

        Never raises: a tracking-store hiccup must not hide why the trial ended.
        """
        try:
            run_id = self.find(number)
            if run_id is None:
                return self.stub(number, state, status or "FAILED",
                                 {**self.tags(number, state, retry), **tags}, {})
            for key, value in {**tags, N.TRIAL_STATE: state}.items():
                self.client.set_tag(run_id, key, value)
            if status:
                self.client.set_terminated(run_id, status)
            return run_id
        except Exception as exc:  # noqa: BLE001 - reported, then the original error goes on
            log.warning("could not record trial %d's end in MLflow: %r", number, exc)
            return None

    def find(self, number: int) -> str | None:
        found = self.client.search_runs(
            [self.experiment_id], max_results=1,
            filter_string=(f"tags.`{N.PARENT_TAG}` = '{self.parent_run_id}' and "
                           f"tags.`{N.TRIAL_NUMBER_TAG}` = '{number}'"))
        return found[0].info.run_id if found else None

    def stub(self, number: int, state: str, status: str, tags: dict[str, str],
             params: dict) -> str:
        """A child run for a trial that never trained: its config and why, nothing else."""
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{number}",
                                     tags={**tags, "stage": self.stage})
        self.client.log_batch(run.info.run_id,
                              params=[MlflowParam(k, str(v)) for k, v in params.items()])
        self.client.set_terminated(run.info.run_id, status)
        return run.info.run_id
