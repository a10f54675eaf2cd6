"""The command line of ``python -m mnist_mlflow.predict``: flags, the model from MLflow, the output.

    python -m mnist_mlflow.predict IMAGE... [--model models:/mnist-8k@champion] [--json]

Each file is preprocessed the way MNIST was made (see `mnist_mlflow.preprocess`), then the
readable files go through the model in batches of at most `models.MAX_BATCH`. A file that
cannot be used gets an error line of its own; the others are still classified. Exit code 1 if
any file failed, 2 for a bad flag or a model that could not be loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict
from typing import Iterator

import mlflow.pyfunc

from mnist_mlflow import config as C
from mnist_mlflow.predict import predict_files
from mnist_mlflow.preprocess import MAX_PIXELS
from tracking import cli

DEFAULT_MODEL = "models:/mnist-8k@champion"


def load_model(uri: str):
    """A pyfunc model: predict((N, 1, 28, 28) float32 raw pixels) -> (N, 10) logits."""
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


def parser() -> cli.Parser:
    p = cli.parser("python -m mnist_mlflow.predict", __doc__)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, ... of one digit")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model URI (default {DEFAULT_MODEL}); runs:/, models:/ or a path")
    p.add_argument("--json", action="store_true", help="print one JSON list")
    cli.add(p, "--max-pixels", int, 1, unset=MAX_PIXELS,
            help=f"refuse images larger than this, before decoding (default {MAX_PIXELS:,})")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except C.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
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
