"""The names that tie a search together across processes and stores: tags, attributes, states.

MLflow tags, Optuna attributes and the trial states. Changing one changes what runs and
studies record."""

from __future__ import annotations

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

# ---------------------------------------------------------------- MLflow tags
PARENT_TAG = MLFLOW_PARENT_RUN_ID  # "mlflow.parentRunId": what nests a run, in any process
TRIAL_STATE = "trial_state"  # a trial's run: one of STATES
ROLE = "search_role"  # PARENT_ROLE on the search's own run, TRIAL_ROLE on each trial's
PARENT_ROLE, TRIAL_ROLE = "parent", "trial"
STUDY_TAG = "optuna.study_name"  # also on tune and confirm runs
STORAGE_TAG = "optuna.storage"
TRIAL_NUMBER_TAG = "optuna.trial_number"
WORKER_TAG = "optuna.worker"
RETRY_OF_TAG = "optuna.retry_of"
RACE_TRIAL_TAG = "optuna.race_trial"  # a racing trial's further seed runs, nested under its run
RACE_ROLE = "race-seed"

# ---------------------------------------------------------------- Optuna user attributes
# of the study (a shared search's parent run) and of each trial (where its run lives)
PARENT_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
# of a trial
RUN_ATTR = "mlflow_run_id"
WORKER_ATTR = "worker"  # host:pid
RETRY_OF = "retry_of"  # the trial this one runs again: after Ctrl-C or a dead worker
INTERRUPTED = "interrupted"  # Ctrl-C'd: a resumed search queues it again
SURPLUS_ATTR = "surplus"
REJECTED_ATTR = "rejected"  # the reason: over the parameter budget
CONFIG = "config"  # the flat config the trial trained
NUM_PARAMS = "num_params"
VAL_HOLD_EPOCH = "val_hold_epoch"
INCUMBENT = "incumbent"  # the base config, enqueued as a new study's first trial
EPOCHS_TRAINED = "epochs_trained"  # over all its seeds, however the trial ended
SEED_SCORES = "seed_scores"  # {seed: objective} of every seed the trial trained (racing)
STOPPED_ATTR = "stopped_early"  # the reason: it could no longer come near the best trial, or time ran out
RACE_CUT = "race_cut"  # also a tag: the hard budget ended its race; it scores the seeds it finished

# ---------------------------------------------------------------- trial states
# One vocabulary for the trial_state tag, the printed counts and trials.csv.
COMPLETE = "COMPLETE"  # run FINISHED, metric `objective`
PRUNED = "PRUNED"  # run KILLED: the pruner stopped it
STOPPED = "STOPPED"  # run KILLED: it could no longer come within the race margin of the best, or time ran out
REJECTED = "REJECTED"  # run KILLED, never trained: over the parameter budget
FAIL = "FAIL"  # run FAILED, or KILLED when interrupted; Optuna's word
SURPLUS = "SURPLUS"  # run KILLED, never trained: a shared search's trial past its quota
RUNNING = "RUNNING"  # still training (or queued, for a count)
STATES = (COMPLETE, PRUNED, STOPPED, REJECTED, FAIL, SURPLUS, RUNNING)
# The parent's count metrics; their names predate this vocabulary and runs are compared by them.
COUNT_METRICS = {COMPLETE: "n_complete", PRUNED: "n_pruned", STOPPED: "n_stopped_early",
                 REJECTED: "n_rejected",
                 FAIL: "n_failed", SURPLUS: "n_surplus", RUNNING: "n_unfinished"}
