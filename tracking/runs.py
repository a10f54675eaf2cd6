"""The one logging code path: every stage run, search trial and benchmark goes through here.

`run_training` validates everything that can fail cheaply (config, budget, data, store)
before a run exists, so bad input creates no run; once a run exists it always ends
FINISHED, FAILED or KILLED, never RUNNING.
"""

from __future__ import annotations

import contextlib
import platform
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import mlflow
import numpy as np
import torch
import yaml
from mlflow.models import infer_signature

from mnist_mlflow import config as C
from mnist_mlflow import evaluation, explore, figures
from mnist_mlflow import threads as T
from mnist_mlflow.data import Mnist, Splits, load_mnist, make_splits
from mnist_mlflow.models import count_params, format_summary, layer_summary
from mnist_mlflow.train import (EpochMetrics, TrainResult, fit, init_model, predict_logits,
                                resolve_device)
from tracking import hardware, liveness

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "mnist_mlflow"
MODEL_NAME = "model"  # the logged model's name inside a run
CHECKPOINT_DIR, CHECKPOINT_FILE = "checkpoint", "last.pt"  # replaced after every epoch
THREADS_PARAM = "threads_resolved"  # the torch threads a run trained with (its `threads` may say auto)
ADDED_CONFIG_KEYS = {"threads": "auto"}  # config keys newer than some logged runs: their default


class ResumeError(RuntimeError):
    """A run cannot be resumed: unknown, finished, or without a checkpoint."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into the same path as Ctrl-C; `signum` says which signal it was."""

    def __init__(self, signum: int, again: bool = False):
        super().__init__(f"signal {signum}" + (", again" if again else ""))
        self.signum = signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM raises `Interrupted` so a run ends KILLED rather than vanishing."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Interrupts:
    """Ctrl-C and SIGTERM while installed: the first one is the request to stop.

    It raises `Interrupted` at once, except while `deferred()` (training): there it sets a flag
    that training checks between batches, so it never lands inside MLflow's logging or a
    checkpoint's upload (where it could leave the store half-written). After it, the same signal
    again interrupts at once (a second Ctrl-C) and the other one is ignored, through the end of
    the run: `mlflow run` answers Ctrl-C by sending its command SIGTERM, the same request, at a
    moment of its choosing, and it must cut short neither a checkpoint nor the run's end.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferring = self._installed = False

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum
            if not self._deferring:
                raise Interrupted(signum)
        elif signum == self.signum:
            raise Interrupted(signum, again=True)

    def raise_if_set(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def deferred(self) -> Iterator["Interrupts"]:
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    @contextlib.contextmanager
    def installed(self) -> Iterator["Interrupts"]:
        """Its handlers, the previous ones back at the end; inside its own scope, nothing more."""
        if self._installed:
            yield self
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        try:
            previous = [signal.signal(s, self._handle) for s in sigs]
        except ValueError:  # not the main thread: leave signals alone
            yield self
            return
        self._installed = True
        try:
            yield self
        finally:
            self._installed = False
            for s, handler in zip(sigs, previous):
                signal.signal(s, handler)


@contextlib.contextmanager
def tracked_run(**start_kwargs) -> Iterator[mlflow.ActiveRun]:
    """`mlflow.start_run` whose end status tells what happened: FINISHED, FAILED or KILLED.

    While it runs, the run records this process as its owner and a heartbeat
    (tracking/liveness.py), so a run whose process died is found and closed by tracking.doctor.
    """
    run = mlflow.start_run(**start_kwargs)
    status, hb = "FINISHED", None
    try:
        hb = liveness.Heartbeat(run.info.run_id).start()
        yield run
    except KeyboardInterrupt as exc:
        exc.run_id = run.info.run_id  # for the caller's "resume with" line
        status = "KILLED"
        raise
    except BaseException as exc:
        with contextlib.suppress(AttributeError):
            exc.run_id = run.info.run_id
        import optuna  # here: stage runs need not import it

        if not isinstance(exc, optuna.TrialPruned):  # a pruned trial is no error (search closes it)
            with contextlib.suppress(Exception):  # the store may be what failed
                mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])  # the UI says why
        status = "FAILED"
        raise
    finally:
        if hb is not None:
            hb.stop()  # no beat after the end
        mlflow.end_run(status)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR.parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def versions() -> dict[str, str]:
    import cv2
    import optuna
    import torchvision

    return {"version.python": platform.python_version(), "version.torch": torch.__version__,
            "version.torchvision": torchvision.__version__, "version.mlflow": mlflow.__version__,
            "version.optuna": optuna.__version__, "version.numpy": np.__version__,
            "version.opencv": cv2.__version__}


def dataset_source(source: str) -> str:
    """MLflow resolves dataset sources by scheme and knows no ``idx:``: give it the folder."""
    return source.removeprefix("idx:")


def log_datasets(mnist: Mnist, splits: Splits) -> None:
    parts = [("train", splits.train_x, splits.train_y, "training"),
             ("val", splits.val_x, splits.val_y, "validation"),
             ("test", splits.test_x, splits.test_y, "testing")]
    for name, x, y, context in parts:
        if y is None:
            continue
        ds = mlflow.data.from_numpy(x, targets=y, source=dataset_source(mnist.source), name=f"mnist-{name}",
                                    digest=f"{mnist.digest}-{name}-{len(y)}")
        for attempt in range(3):
            try:
                mlflow.log_input(ds, context=context)
                break
            except mlflow.MlflowException as exc:
                # two processes logging the same dataset at once (search workers): the loser's
                # INSERT hits the store's unique index; the second try finds the dataset there
                if "datasets" not in str(exc).lower() or attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))


def log_epoch(metrics: EpochMetrics) -> None:
    """Per-epoch metrics, step = epoch number from 1, and a heartbeat."""
    mlflow.log_metrics(metrics.as_metrics(), step=metrics.epoch)
    mlflow.set_tag(liveness.HEARTBEAT, f"{time.time():.3f}")


def summarize(cfg: C.RunConfig, history: list[EpochMetrics]) -> evaluation.HoldSummary:
    return evaluation.hold_summary([h.test_accuracy for h in history], cfg.target.accuracy,
                                   cfg.target.hold)


def summary_text(cfg: C.RunConfig, hold: evaluation.HoldSummary, num_params: int,
                 history: list[EpochMetrics]) -> str:
    last = history[-1]
    reached = (f"held >= {cfg.target.accuracy}% for {cfg.target.hold} epochs at epoch "
               f"{hold.target_reached_epoch} (min {hold.held_accuracy:.2f}%)"
               if hold.target_reached_epoch else
               f"did not hold >= {cfg.target.accuracy}% for {cfg.target.hold} epochs")
    total = sum(h.epoch_seconds for h in history)
    return (f"{cfg.stage}: {num_params:,} parameters, {len(history)} epochs, {total:.0f} s\n"
            f"best test accuracy {hold.best_accuracy:.2f}%, final {last.test_accuracy:.2f}%, "
            f"longest hold {hold.hold_epochs} epochs\n{reached}\n")


def log_model(model: torch.nn.Module, example: np.ndarray) -> None:
    """Pickle format with our code attached: it loads back as the real class, on any machine.

    Contract: float32 raw pixels 0-255, (N, 1, 28, 28) -> (N, 10) logits.
    """
    model = model.cpu().eval()
    with torch.inference_mode():
        out = model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(model, name=MODEL_NAME, signature=infer_signature(example, out),
                             input_example=example, serialization_format="pickle",
                             code_paths=[str(PACKAGE_DIR)])


def log_results(cfg: C.RunConfig, splits: Splits, result: TrainResult) -> evaluation.HoldSummary:
    """Summary metrics, figures and the model, after training."""
    num_params = count_params(result.model)
    hold = summarize(cfg, result.history)
    summary = {"best_test_accuracy": hold.best_accuracy, "hold_epochs": hold.hold_epochs}
    if hold.target_reached_epoch is not None:
        summary["target_reached_epoch"] = hold.target_reached_epoch
        summary["held_test_accuracy"] = hold.held_accuracy
    mlflow.log_metrics(summary)
    mlflow.log_text(summary_text(cfg, hold, num_params, result.history), "summary.txt")

    logits = predict_logits(result.model, torch.from_numpy(splits.test_x).unsqueeze(1)
                            .to(result.device)).cpu()
    pred = logits.argmax(1).numpy()
    wrong = evaluation.misclassified(splits.test_y, pred)
    mlflow.log_figure(figures.curves_figure(result.history), "figures/curves.png")
    mlflow.log_figure(figures.confusion_figure(evaluation.confusion_matrix(splits.test_y, pred)),
                      "figures/confusion_matrix.png")
    if len(wrong):
        mlflow.log_figure(figures.misclassified_figure(splits.test_x[wrong], splits.test_y[wrong],
                                                       pred[wrong]), "figures/misclassified.png")
    figures.plt.close("all")
    log_model(result.model, splits.test_x[:2, None].astype(np.float32))
    return hold


def log_data_study(splits: Splits, mean: float, std: float) -> None:
    """Stage 1: pixel statistics and the figures that motivate augmentation and the RF."""
    x, y = splits.train_x, splits.train_y
    mlflow.log_metrics({"pixel_mean": mean, "pixel_std": std})
    mlflow.log_figure(figures.sample_grid(x, y), "figures/samples.png")
    idx = explore.thickness_examples(x, y, digit=1)
    mlflow.log_figure(figures.thickness_figure(x[idx], explore.ink(x[idx])), "figures/thickness.png")
    mlflow.log_figure(figures.morphology_figure(x[idx]), "figures/morphology.png")
    study = explore.receptive_field_study(x)
    mlflow.log_figure(figures.rf_study_figure(study), "figures/receptive_field_study.png")
    mlflow.log_metric("chosen_receptive_field", study.chosen_rf)
    figures.plt.close("all")


def log_checkpoint(state: dict) -> None:
    """The latest epoch's full training state, so an interrupted run can be resumed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT_FILE
        torch.save(state, path)
        mlflow.log_artifact(str(path), CHECKPOINT_DIR)


def config_of_run(run_id: str) -> C.RunConfig:
    """The config a run logged, rebuilt from its params (values come back as strings)."""
    params = mlflow.MlflowClient().get_run(run_id).data.params
    keys = C.flatten(C.RunConfig())
    params = {**ADDED_CONFIG_KEYS, **params}
    values = {k: None if params[k] == "None" else yaml.safe_load(params[k]) for k in keys if k in params}
    if len(values) != len(keys):
        raise ResumeError(f"run {run_id} lacks config params {sorted(set(keys) - set(values))[:5]}: "
                          "it was not made by this project")
    if values.get("data.data_dir") is not None:
        values["data.data_dir"] = params["data.data_dir"]  # a path stays a string
    return C.from_dict({}, values)


def check_resumable(run_id: str) -> None:
    """Cheap checks, no download: the run exists, is not FINISHED, is not still being trained
    by a live process (tracking/liveness.py) and has a checkpoint."""
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    if run.info.status == "FINISHED":
        raise ResumeError(f"run {run_id} is FINISHED: nothing to resume")
    if run.info.status == "RUNNING":
        verdict = liveness.judge(run)
        if verdict.alive:
            raise ResumeError(f"run {run_id} is still running ({verdict.reason}): stop that "
                              "process first (Ctrl-C keeps its checkpoint), then resume")
    if not any(a.path == f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"
               for a in client.list_artifacts(run_id, CHECKPOINT_DIR)):
        raise ResumeError(f"run {run_id} has no {CHECKPOINT_DIR}/{CHECKPOINT_FILE} to resume from "
                          "(it stopped before its first epoch ended)")


def resumed_threads(run_id: str) -> int:
    """The torch threads the run trained with: bf16 results depend on them, so a resume reuses
    them. Runs from before the setting trained with torch's default."""
    raw = mlflow.MlflowClient().get_run(run_id).data.params.get(THREADS_PARAM)
    return int(raw) if raw not in (None, "", "None") else T.TORCH_DEFAULT


def load_checkpoint(run_id: str) -> dict:
    """The run's last checkpoint; refuses finished runs and runs without one."""
    check_resumable(run_id)
    local = mlflow.artifacts.download_artifacts(run_id=run_id,
                                                artifact_path=f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}")
    return torch.load(local, weights_only=True)


@dataclass
class RunOutcome:
    run_id: str
    result: TrainResult
    hold: evaluation.HoldSummary


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
    Ctrl-C and SIGTERM follow `interrupts` (a caller's, installed for longer: a process's),
    or Interrupts installed for this run.
    """
    state = load_checkpoint(resume_run_id) if resume_run_id else None
    mnist, splits = prepare(cfg, mnist)
    resolve_device(cfg.device)  # device=cuda without CUDA: no run is created
    model, mean, std = init_model(cfg, splits.train_x)  # BudgetError here: no run is created
    n_threads = resumed_threads(resume_run_id) if resume_run_id else T.resolve(cfg.threads)
    params = {**C.flatten(cfg), THREADS_PARAM: n_threads, "num_params": count_params(model),
              "data.digest": mnist.digest,
              "data.source": mnist.source, "data.mean": round(mean, 6), "data.std": round(std, 6),
              **{f"data.{k}_size": v for k, v in splits.sizes().items()},
              **versions(), "git_commit": git_commit(), **hardware.params()}

    def on_epoch(m: EpochMetrics) -> Optional[bool]:
        log_epoch(m)
        return on_epoch_end(m) if on_epoch_end is not None else None  # True: stop training

    start = ({"run_id": resume_run_id} if resume_run_id else
             {"run_name": run_name or cfg.stage, "nested": nested, "tags": {"stage": cfg.stage, **(tags or {})}})
    interrupts = interrupts if interrupts is not None else Interrupts()
    # installed around the run, so that the run's end, too, is safe from a second signal
    with interrupts.installed(), tracked_run(log_system_metrics=True, **start) as run:
        if state is None:  # a resumed run has all of this already
            mlflow.log_params(params)
            log_datasets(mnist, splits)
            mlflow.log_text(format_summary(layer_summary(model)), "model_summary.txt")
            if cfg.study_data:
                log_data_study(splits, mean, std)
        with interrupts.deferred():
            try:
                result = fit(C.replace(cfg, {"threads": n_threads}), splits, on_epoch_end=on_epoch,
                             progress=progress, model=model,
                             on_checkpoint=log_checkpoint if checkpoints or state else None,
                             resume_from=state, stop_requested=interrupts)
            except KeyboardInterrupt:
                interrupts.raise_if_set()  # as Interrupted, which says which signal it was
                raise
        interrupts.raise_if_set()  # arrived during the last epoch's logging
        if log_model_artifact:
            hold = log_results(cfg, splits, result)
        else:
            hold = summarize(cfg, result.history)
        return RunOutcome(run.info.run_id, result, hold)
