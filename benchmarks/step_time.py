"""Seconds per training step of config variants, interleaved in one process.

Each repetition runs one epoch of `fit` per variant, in turn, over the same slice of real MNIST
(default 150 batches of 128, test pass of 256 images), so a drift in this machine's speed hits all
variants alike. Prints the median and minimum ms per step (setup and the test pass included),
that median times the steps of a 60,000-image epoch (to compare batch sizes), and each
variant's speed per step relative to the first. Variants are overrides of experiments/stage3.yaml:

    python -m benchmarks.step_time "sparse:" "bernoulli:model.dropout_mask=bernoulli"
    python -m benchmarks.step_time "average:" "no average:optim.ema_decay=null"
    python -m benchmarks.step_time "fp32:" "bf16:precision=bf16"
    python -m benchmarks.step_time "pool first:" "pool after BN:model.pool_before_bn=false"
    python -m benchmarks.step_time "batch 128:" "batch 64:optim.batch_size=64" "batch 256:optim.batch_size=256"
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch

from mnist_mlflow import config as C
from mnist_mlflow import threads as T
from mnist_mlflow.data import load_mnist, make_splits
from mnist_mlflow.train import fit
from tracking import cli

STAGE3 = Path(__file__).resolve().parent.parent / "experiments/stage3.yaml"


def parse_variant(spec: str) -> tuple[str, list[str]]:
    """'name:key=value,key=value' -> (name, ["key=value", ...])."""
    name, sep, rest = spec.partition(":")
    if not sep or not name:
        raise C.ConfigError(f"variant {spec!r}: expected NAME:KEY=VALUE,... (overrides may be empty)")
    return name, [item for item in rest.split(",") if item]


def parser() -> cli.Parser:
    p = cli.parser("python -m benchmarks.step_time", __doc__)
    p.add_argument("variants", nargs="+", help="NAME:KEY=VALUE,... (the first is the reference)")
    cli.add(p, "--batches", int, 1, unset=150, help="batches per epoch (default 150)")
    cli.add(p, "--repeats", int, 1, unset=5, help="epochs of each variant, in turn (default 5)")
    return p


def main(argv=None) -> dict[str, list[float]]:
    try:
        args = parser().parse_args(argv)
        specs = [parse_variant(v) for v in args.variants]
        # one thread count for every variant, decided once (auto: the cores free now)
        forced = {"data.test_limit": 256, "optim.epochs": 1, "device": "cpu",
                  "threads": T.resolve(C.load(STAGE3).threads)}
        configs = {name: C.load(STAGE3, overrides) for name, overrides in specs}
        configs = {name: C.replace(cfg, {**forced, "data.train_limit": cfg.optim.batch_size * args.batches})
                   for name, cfg in configs.items()}
        if len(configs) != len(specs):
            raise C.ConfigError("variant names must differ")
    except C.ConfigError as exc:
        cli.exit_bad_input(exc)
    mnist = load_mnist()
    splits = {name: make_splits(mnist, train_limit=cfg.data.train_limit, test_limit=256)
              for name, cfg in configs.items()}
    ms = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, cfg in configs.items():
            start = time.perf_counter()
            fit(cfg, splits[name], progress=False)
            ms[name].append((time.perf_counter() - start) * 1000 / args.batches)
    ref = statistics.median(ms[specs[0][0]])
    print(f"torch threads {torch.get_num_threads()}, {args.batches} batches per epoch, "
          f"{args.repeats} interleaved repeats")
    print(f"{'variant':<24} {'median ms/step':>15} {'min':>7} {'s per 60k epoch':>16}  speed per step vs "
          f"{specs[0][0]}")
    for name, times in ms.items():
        median = statistics.median(times)
        epoch = median * math.ceil(60000 / configs[name].optim.batch_size) / 1000
        print(f"{name:<24} {median:>15.2f} {min(times):>7.2f} {epoch:>16.1f}  {ref / median:.2f}x")
    return ms


if __name__ == "__main__":
    main()
