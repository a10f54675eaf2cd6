"""Matplotlib figures; each function returns a Figure and leaves saving to the caller."""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs, CI and servers have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .augment import cv_dilate, cv_erode  # noqa: E402
from .explore import RFStudy  # noqa: E402


def image_grid(images: np.ndarray, titles: Sequence[str], cols: int = 10, title: str = "") -> plt.Figure:
    rows = max(1, int(np.ceil(len(images) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.3), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t in zip(axes.flat, images, titles):
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.set_title(t, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def sample_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 4) -> plt.Figure:
    idx = np.concatenate([np.flatnonzero(labels == d)[:per_class] for d in range(10)])
    idx = idx.reshape(10, -1).T.ravel()  # one digit per column
    return image_grid(images[idx], [str(labels[i]) for i in idx], title="Training samples")


def thickness_figure(images: np.ndarray, counts: np.ndarray) -> plt.Figure:
    return image_grid(images, [f"ink {c}" for c in counts], cols=len(images),
                      title="The same digit, thin to thick strokes")


def morphology_figure(images: np.ndarray) -> plt.Figure:
    """Rows: original, OpenCV 3x3 dilation, 3x3 erosion of the same digits."""
    rows = [images, np.stack([cv_dilate(i) for i in images]), np.stack([cv_erode(i) for i in images])]
    names = ["original", "dilation", "erosion"]
    flat = np.concatenate(rows)
    titles = [n for n in names for _ in images]
    return image_grid(flat, titles, cols=len(images), title="Morphological thickness changes")


def rf_study_figure(study: RFStudy) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, data, name in zip(axes, (study.rows, study.cols), ("rows", "columns")):
        bins = np.arange(0, max(data.max(), study.chosen_rf) + 2) - 0.5
        ax.hist(data, bins=bins, color="tab:blue")
        ax.axvline(study.chosen_rf - 1, color="tab:red", ls="--",
                   label=f"spanned by RF {study.chosen_rf}x{study.chosen_rf}")
        ax.set_xlabel(f"low-to-high intensity distance along {name} (pixels)")
        ax.legend()
    axes[0].set_ylabel(f"edges in {study.sample_size} images")
    fig.suptitle("Receptive-field study")
    fig.tight_layout()
    return fig


def curves_figure(history: Sequence) -> plt.Figure:
    """Accuracy and loss, train vs test (and val when present), per epoch."""
    epochs = [h.epoch for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-o"), ("test", "-s"), ("val", "-^")):
        acc = [getattr(h, f"{split}_accuracy") for h in history]
        if acc[0] is None:
            continue
        ax_acc.plot(epochs, acc, style, label=split, ms=3)
        ax_loss.plot(epochs, [getattr(h, f"{split}_loss") for h in history], style, label=split, ms=3)
    ax_acc.axhline(99.4, color="gray", ls=":", label="99.4%")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_acc.legend()
    ax_loss.legend()
    fig.tight_layout()
    return fig


def confusion_figure(cm: np.ndarray) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 5.5))
    ax.imshow(np.log1p(cm), cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if i == j else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title="Test confusion matrix")
    fig.tight_layout()
    return fig


def misclassified_figure(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray) -> plt.Figure:
    titles = [f"true {t} / pred {p}" for t, p in zip(y_true, y_pred)]
    return image_grid(images, titles, cols=5, title="Misclassified test digits")
