"""The run lifecycle: how a run starts, is owned and ends FINISHED, FAILED or KILLED, never RUNNING.

Stage runs and search trials train through `run_training`, which validates everything that
can fail cheaply (config, budget, data, store) before a run exists, so bad input creates no
run. Runs that wrap others (consistency, confirm, tune) and the benchmarks that log
(time_to_hold, shared_cores) open theirs with `tracked_run`; a run this process did not
start (a search's parent run) is owned with `owned`. What is logged lives in provenance.py and
run_logging.py next to this file, checkpoints and resuming in checkpoints.py, signals in signals.py.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import mlflow

from mnist_mlflow import config as C
from mnist_mlflow import evaluation
from mnist_mlflow import threads as T
from mnist_mlflow.data import Mnist, Splits, load_mnist, make_splits
from mnist_mlflow.models import count_params
from mnist_mlflow.summary import format_summary, layer_summary
from mnist_mlflow.train import EpochMetrics, TrainResult, fit, init_model, resolve_device
from tracking.lifecycle import hardware, liveness
from tracking.lifecycle.checkpoints import (THREADS_PARAM, load_checkpoint, log_checkpoint,
                                            log_unlogged_epochs, resumed_threads)
from tracking.lifecycle.provenance import git_commit, log_datasets, versions
from tracking.lifecycle.run_logging import hold_of, log_data_study, log_epoch, log_results, summary_text
from tracking.lifecycle.signals import Interrupts


class StopRun(Exception):
    """Raised inside an owned run to end it KILLED on purpose, without an `error` tag: e.g. a
    pruned trial (tracking/search/objective.py). The run is ended once, here."""


@dataclass
class RunEnd:
    status: str = "FINISHED"  # what the run is ended with; `owned` sets it


@contextlib.contextmanager
def owned(run_id: str, end: RunEnd, shared: bool = False) -> Iterator[RunEnd]:
    """While inside, this process owns run `run_id`: it records this process as an owner and
    a heartbeat (tracking/lifecycle/liveness.py; `shared`: other processes may own it too), so a run
    whose process died is found and closed by tracking.doctor. How the block ends sets
    `end.status`, for the caller to end the run with: FINISHED; KILLED on Ctrl-C, SIGTERM or a
    StopRun; FAILED on any other exception, whose reason becomes the run's `error` tag.
    """
    hb = None
    try:
        hb = liveness.Heartbeat(run_id, shared=shared).start()
        yield end
        clear_error(run_id)
    except (KeyboardInterrupt, StopRun) as exc:
        exc.run_id = run_id  # for the caller's "resume with" line
        end.status = "KILLED"
        raise
    except BaseException as exc:
        with contextlib.suppress(AttributeError):
            exc.run_id = run_id
        with contextlib.suppress(Exception):  # the store may be what failed
            reason = f"{type(exc).__name__}: {exc}"[:5000]
            mlflow.MlflowClient().set_tag(run_id, "error", reason)  # the UI says why
        end.status = "FAILED"
        raise
    finally:
        if hb is not None:
            hb.stop()  # no beat after the end


def clear_error(run_id: str) -> None:
    """A run that ends well carries no `error` of an earlier, failed attempt (a resumed run)."""
    client = mlflow.MlflowClient()
    if "error" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "error")


@contextlib.contextmanager
def tracked_run(**start_kwargs) -> Iterator[mlflow.ActiveRun]:
    """`mlflow.start_run`, owned (see `owned`) and ended with the status that tells what happened."""
    run = mlflow.start_run(**start_kwargs)
    end = RunEnd()
    try:
        with owned(run.info.run_id, end):
            yield run
    finally:
        mlflow.end_run(end.status)


@dataclass
class RunOutcome:
    run_id: str
    result: TrainResult
    hold: evaluation.HoldSummary

    def summary(self, cfg: C.RunConfig) -> str:
        """summary.txt's lines: parameters and time, best and final accuracy, the hold."""
        return summary_text(cfg, self.hold, count_params(self.result.model), self.result.history)


def prepare(cfg: C.RunConfig, mnist: Mnist | None = None) -> tuple[Mnist, Splits]:
    """Data and splits; raises before any run exists if something is wrong."""
    mnist = mnist or load_mnist(cfg.data.data_dir)
    d = cfg.data
    return mnist, make_splits(mnist, d.val_size, d.split_seed, d.train_limit, d.test_limit)


def run_training(cfg: C.RunConfig, *, mnist: Mnist | None = None, run_name: str | None = None,
                 nested: bool = False, tags: dict[str, str] | None = None,
                 on_epoch_end: Optional[Callable[[EpochMetrics], Optional[bool]]] = None,
                 log_model_artifact: bool = True, progress: bool = True,
                 checkpoints: bool = False, resume_run_id: str | None = None,
                 interrupts: Interrupts | None = None) -> RunOutcome:
    """Trains `cfg` inside one MLflow run in the active experiment and logs everything.

    With `checkpoints`, the training state is logged after every epoch; `resume_run_id`
    continues that (unfinished) run from its last checkpoint, in the same MLflow run.
    `cfg.threads` is resolved once here and logged (a resume reuses the run's number).
    Ctrl-C and SIGTERM follow `interrupts`, by default the process's (an entry point's, see
    tracking/mlflow_run.run_entry_point), or Interrupts installed for this run.
    """
    state = load_checkpoint(resume_run_id) if resume_run_id else None
    mnist, splits = prepare(cfg, mnist)
    resolve_device(cfg.device)  # device=cuda without CUDA: no run is created
    model, mean, std = init_model(cfg, splits.train_x)  # BudgetError here: no run is created
    n_threads = resumed_threads(resume_run_id) if resume_run_id else T.resolve(cfg.threads)
    if (warning := hardware.bf16_warning(cfg.precision, cfg.device)) and progress:
        print(warning, file=sys.stderr, flush=True)
    params = {**C.flatten(cfg), THREADS_PARAM: n_threads, "num_params": count_params(model),
              "data.digest": mnist.digest,
              "data.source": mnist.source, "data.mean": round(mean, 6), "data.std": round(std, 6),
              **{f"data.{k}_size": v for k, v in splits.sizes().items()},
              **versions(), "git_commit": git_commit(), **hardware.params()}

    checkpointed = checkpoints or state is not None
    # with checkpoints an epoch's metrics follow its checkpoint: a kill between the two loses
    # nothing (the resume logs them from the checkpoint), where the other order logged the
    # epoch twice (once before the kill, again when the resume trained it anew)
    pending: list[EpochMetrics] = []

    def on_epoch(m: EpochMetrics) -> Optional[bool]:
        if checkpointed:
            pending.append(m)
        else:
            log_epoch(m)
        return on_epoch_end(m) if on_epoch_end is not None else None  # True: stop training

    def on_checkpoint(state_now: dict) -> None:
        log_checkpoint(state_now)
        while pending:
            log_epoch(pending.pop(0))

    start = ({"run_id": resume_run_id} if resume_run_id else
             {"run_name": run_name or cfg.stage, "nested": nested, "tags": {"stage": cfg.stage, **(tags or {})}})
    interrupts = interrupts if interrupts is not None else Interrupts.current()
    # installed around the run, so that the run's end, too, is safe from a second signal
    with interrupts.installed(), tracked_run(log_system_metrics=True, **start) as run:
        if state is None:  # a resumed run has all of this already
            mlflow.log_params(params)
            log_datasets(mnist, splits)
            mlflow.log_text(format_summary(layer_summary(model)), "model_summary.txt")
            if cfg.study_data:
                log_data_study(splits, mean, std)
        else:
            log_unlogged_epochs(run.info.run_id, state)
        with interrupts.deferred():
            try:
                result = fit(C.replace(cfg, {"threads": n_threads}), splits, on_epoch_end=on_epoch,
                             progress=progress, model=model,
                             on_checkpoint=on_checkpoint if checkpointed else None,
                             resume_from=state, stop_requested=interrupts)
            except KeyboardInterrupt:
                interrupts.raise_if_set()  # as Interrupted, which says which signal it was
                raise
        interrupts.raise_if_set()  # arrived during the last epoch's logging
        if log_model_artifact:
            hold = log_results(cfg, splits, result)
        else:
            hold = hold_of(cfg, result.history)
        return RunOutcome(run.info.run_id, result, hold)
