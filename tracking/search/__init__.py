"""Optuna search under the 8,000-parameter budget, tracked in MLflow: ``python -m tracking.search``.

One invocation = one parent MLflow run around the study's trials; every trial is a child run
(see objective.py for the trial states). With ``--workers K``, K spawned worker processes
optimize the same study, each with its share of the trials; their child runs carry the
parent's id in the `mlflow.parentRunId` tag, which is all MLflow needs to nest them. The study
lives in Optuna storage (SQLite by default), so running the same command again resumes it:
completed trials are kept and never repeated, and a trial interrupted by Ctrl-C or SIGTERM is
queued to run again first.

With ``--study-trials N`` the search is shared: the same command on several machines (one
PostgreSQL storage, one tracking server) joins one study and one parent run, and the workers
together finish exactly N trials, retrying those of a worker that died (workers.py).

Modules: cli (flags, output), plan (what an invocation asks for and will do), space (the search
file), sampling, study (storage and study), run (one invocation), parent (the parent run),
workers, objective (one trial: where its state is decided), trial_runs (the trials' MLflow
runs), report (what the parent run holds), names (tags, attributes, trial states).
"""
