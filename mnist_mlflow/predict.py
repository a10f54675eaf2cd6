"""Classifies image files of single digits with a registered model.

    python -m mnist_mlflow.predict IMAGE... [--model models:/mnist-8k@champion] [--json]

Each file is preprocessed the way MNIST was made (see `preprocess`), then the readable
files go through the model in batches of at most `models.MAX_BATCH`. A file that cannot be used gets an error line
of its own; the others are still classified. Exit code 1 if any file failed, 2 if the
model could not be loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from . import models
from .preprocess import MAX_PIXELS, ImageError, batch, load_digit

DEFAULT_MODEL = "models:/mnist-8k@champion"


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


def load_model(uri: str):
    """A pyfunc model: predict((N, 1, 28, 28) float32 raw pixels) -> (N, 10) logits."""
    import mlflow.pyfunc  # here, not at the top: tests of the helpers need no MLflow start-up

    return mlflow.pyfunc.load_model(uri)


@contextlib.contextmanager
def quick_http() -> Iterator[None]:
    """MLflow's defaults retry an unreachable server for minutes and wait 120 s for a silent one;
    a command-line user wants the answer in seconds. Variables the user set win."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    added = {k: v for k, v in quick.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_mlflow.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, ... of one digit")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"model URI (default {DEFAULT_MODEL}); runs:/, models:/ or a path")
    parser.add_argument("--json", action="store_true", help="print one JSON list")
    parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                        help=f"refuse images larger than this, before decoding (default {MAX_PIXELS:,})")
    args = parser.parse_args(argv)
    if args.max_pixels < 1:
        print(f"error: --max-pixels={args.max_pixels} is not allowed: 1 or more", file=sys.stderr)
        return 2
    try:
        with quick_http():
            model = load_model(args.model)
    except Exception as exc:  # MLflow raises several kinds for a bad URI or an unreachable store
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: could not load model {args.model!r}: {first}", file=sys.stderr)
        return 2
    results = predict_files(args.images, model, args.max_pixels)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        for r in results:
            print(r.line(), file=sys.stderr if r.error else sys.stdout)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
