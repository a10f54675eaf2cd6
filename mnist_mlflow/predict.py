"""Classifies image files of single digits with any model that has pyfunc's predict.

The library half of ``python -m mnist_mlflow.predict``: each file is preprocessed the way MNIST
was made (see `preprocess`), then the readable files go through the model in batches of at
most `models.MAX_BATCH`; a file that cannot be used gets an error of its own. The command line
(flags, loading the model from MLflow) is tracking/predict.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from . import models
from .preprocess import MAX_PIXELS, ImageError, batch, load_digit


@dataclass(frozen=True)
class Prediction:
    file: str
    digit: Optional[int] = None
    probability: Optional[float] = None
    error: Optional[str] = None

    def line(self) -> str:
        if self.error:
            return f"{self.file}: error: {self.error}"
        return f"{self.file}: {self.digit} (p={self.probability:.3f})"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)  # no overflow for large logits
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def read_images(paths: Sequence[str], max_pixels: int = MAX_PIXELS,
                ) -> tuple[list[np.ndarray], list[str], list[Prediction]]:
    """(28x28 images, their files, an error Prediction per file that failed)."""
    images, ok, failed = [], [], []
    for path in paths:
        try:
            images.append(load_digit(path, max_pixels))
            ok.append(path)
        except ImageError as exc:
            failed.append(Prediction(path, error=str(exc).removeprefix(f"{path}: ")))
        except OSError as exc:  # e.g. a directory or a file we may not read
            failed.append(Prediction(path, error=exc.strerror or str(exc)))
    return images, ok, failed


def predict_files(paths: Sequence[str], model, max_pixels: int = MAX_PIXELS) -> list[Prediction]:
    """Predictions in the order of `paths`; `model` is anything with pyfunc's predict."""
    images, ok, failed = read_images(paths, max_pixels)
    by_file = {p.file: p for p in failed}
    if images:
        step = models.MAX_BATCH  # the model refuses more in one call
        logits = np.concatenate([np.asarray(model.predict(batch(images[i:i + step])), dtype=np.float64)
                                 for i in range(0, len(images), step)])
        probs = softmax(logits)
        for path, p in zip(ok, probs):
            digit = int(p.argmax())
            by_file[path] = Prediction(path, digit, float(p[digit]))
    return [by_file[p] for p in paths]


if __name__ == "__main__":  # the documented command; its command line lives with the MLflow glue
    from tracking.predict import main

    sys.exit(main())
