"""One invocation of the search, local or shared, on one path: study, parent run, workers.

A local search is a shared search whose workers all live in this invocation: both open (or
join) the study, open (or join) the parent run (parent.py), run their workers (workers.py)
and end the parent with the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import optuna

from mnist_mlflow.data import Mnist, load_mnist
from tracking import cli
from tracking.search import parent, report
from tracking.search.plan import Options, resolve
from tracking.search.study import open_storage, open_study, requeue_interrupted
from tracking.search.local import run_jobs
from tracking.search.workers import make_jobs


@dataclass
class SearchResult:
    parent_run_id: str
    study: optuna.Study
    best: Optional[optuna.trial.FrozenTrial]
    counts: dict[str, int] = field(default_factory=dict)  # names.STATES -> trials


def run_search(opts: Options, mnist: Mnist | None = None) -> SearchResult:
    plan = resolve(opts)
    storage = open_storage(plan.storage, plan.heartbeat)
    mnist = mnist or load_mnist(plan.spec.base.data.data_dir)  # fails now, not in every worker
    experiment_id = cli.use_experiment(plan.experiment)
    study, created = open_study(plan.spec, storage, plan.study_name)
    queued = [] if plan.shared else requeue_interrupted(study)  # shared: retried by heartbeat
    parent_id, experiment_id = parent.open_parent(plan, study, storage, created, experiment_id, queued)
    jobs = make_jobs(plan, parent_id, experiment_id, len(study.get_trials(deepcopy=False)))
    with parent.owned(plan, storage, parent_id):
        run_jobs(jobs, mnist)
    study = parent.load(plan, storage)
    return SearchResult(parent_id, study, report.best_trial(study), report.counts(study))
