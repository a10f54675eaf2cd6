"""What a training run logs besides its params: per-epoch metrics, the summary, figures, the model."""

from __future__ import annotations

import time
from importlib.metadata import version

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature

from mnist_mlflow import config as C
from mnist_mlflow import evaluation, explore, figures
from mnist_mlflow.data import Splits
from mnist_mlflow.models import count_params
from mnist_mlflow.evaluation import predict_logits
from mnist_mlflow.train import EpochMetrics, TrainResult
from tracking.lifecycle import liveness
from tracking.lifecycle.provenance import PACKAGE_DIR
from tracking.lifecycle.safe_model import MADE_BY

MODEL_NAME = "model"  # the logged model's name inside a run


def log_epoch(metrics: EpochMetrics) -> None:
    """Per-epoch metrics, step = epoch number from 1, and a heartbeat."""
    mlflow.log_metrics(metrics.as_metrics(), step=metrics.epoch)
    mlflow.set_tag(liveness.HEARTBEAT, f"{time.time():.3f}")


def hold_of(cfg: C.RunConfig, history: list[EpochMetrics]) -> evaluation.HoldSummary:
    """The run's hold of its target, from its test accuracy per epoch."""
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


def model_requirements() -> list[str]:
    """What MLflow's inference finds for our models, pinned to this environment, without the
    subprocess that inference starts to import the model again (half of a short run's time).
    Not our own package: it travels as code (code_paths) and is on no package index."""
    return [*mlflow.pytorch.get_default_pip_requirements(),  # torch, cloudpickle
            *(f"{name}=={version(name)}" for name in ("numpy", "pandas"))]


def log_model(model: torch.nn.Module, example: np.ndarray) -> None:
    """Pickle format with our code attached: it loads back as the real class, on any machine.

    Contract: float32 raw pixels 0-255, (N, 1, 28, 28) -> (N, 10) logits.
    """
    model = model.cpu().eval()
    with torch.inference_mode():
        out = model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(model, name=MODEL_NAME, signature=infer_signature(example, out),
                             input_example=example, serialization_format="pickle",
                             code_paths=[str(PACKAGE_DIR)], pip_requirements=model_requirements())
    mlflow.set_tag(*MADE_BY)  # promotion considers only runs that carry it


def log_results(cfg: C.RunConfig, splits: Splits, result: TrainResult) -> evaluation.HoldSummary:
    """Summary metrics, figures and the model, after training."""
    num_params = count_params(result.model)
    hold = hold_of(cfg, result.history)
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
