"""Training speed when other processes share the cores: threads 1, 2 and auto, quiet and beside
one or two busy processes, in one invocation.

For each number of busy processes (`python -c 'while True: pass'`, at `--busy-nice`), started a
moment before and stopped after, every thread setting trains the same epochs of
experiments/stage3.yaml on the same images; "auto" is resolved beside the busy processes,
exactly as a run resolves it. Prints seconds per epoch and the ratio to torch's
own thread count (what a run used before the `threads` setting) on the quiet machine, and logs
one MLflow run (tag benchmark=shared_cores) with a metric per cell.

    python -m benchmarks.shared_cores                          # threads 1,2,auto; 0,1,2 busy
    python -m benchmarks.shared_cores --train-limit 30000 --epochs 1 --busy 0,1

Run it on an otherwise quiet machine: the busy processes run at normal priority by default.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow

from mnist_mlflow import config as C
from mnist_mlflow import threads as T
from mnist_mlflow.data import load_mnist, make_splits
from mnist_mlflow.train import fit
from tracking import cli
from tracking.lifecycle.runs import tracked_run

STAGE3 = Path(__file__).resolve().parent.parent / "experiments/stage3.yaml"
BUSY_LOOP = "while True: pass"


@dataclass(frozen=True)
class Cell:
    setting: str  # "1", "2", "auto", ...
    busy: int  # busy processes beside the training
    threads: int  # what the setting resolved to
    s_per_epoch: float
    resolve_s: float  # time spent deciding (auto: the load sample)


@contextlib.contextmanager
def busy_processes(n: int, nice: int, settle_s: float) -> Iterator[list[subprocess.Popen]]:
    """`n` pure-Python busy loops, running before the block starts and gone after it."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP],
                              preexec_fn=(lambda: os.nice(nice)) if nice else None)
             for _ in range(n)]
    try:
        if procs:
            time.sleep(settle_s)  # running, and visible to a load sample
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(10)


def measure(cfg: C.RunConfig, splits, setting: str, busy: int) -> Cell:
    start = time.perf_counter()
    n = T.resolve("auto" if setting == "auto" else int(setting))
    resolve_s = time.perf_counter() - start
    result = fit(C.replace(cfg, {"threads": n}), splits, progress=False)
    per_epoch = sum(m.epoch_seconds for m in result.history) / len(result.history)
    print(f"  busy {busy}  threads {setting:>4} -> {n}  {per_epoch:7.2f} s/epoch", flush=True)
    return Cell(setting, busy, n, per_epoch, resolve_s)


def table(cells: list[Cell], settings: list[str], loads: list[int], reference: Cell) -> str:
    by = {(c.setting, c.busy): c for c in cells}
    head = f"{'threads':<10}" + "".join(f"{f'{b} busy':>24}" for b in loads)
    lines = [f"seconds per epoch (resolved threads) and ratio to today's default ({reference.setting} "
             f"threads, quiet: {reference.s_per_epoch:.2f} s/epoch)", head]
    for s in settings:
        row = f"{s:<10}"
        for b in loads:
            c = by[(s, b)]
            ratio = c.s_per_epoch / reference.s_per_epoch
            row += f"{f'{c.s_per_epoch:.2f} s ({c.threads}) {ratio:.2f}x':>24}"
        lines.append(row)
    autos = [c for c in cells if c.setting == "auto"]
    if autos:
        lines.append("auto's decision took " + ", ".join(f"{c.resolve_s:.2f} s ({c.busy} busy)"
                                                         for c in autos))
    return "\n".join(lines)


def log(cells: list[Cell], reference: Cell, text: str, params: dict) -> None:
    mlflow.set_tag("benchmark", "shared_cores")
    mlflow.log_params(params)
    metrics = {}
    for c in cells:
        key = f"threads_{c.setting}.busy_{c.busy}"
        metrics |= {f"s_per_epoch.{key}": c.s_per_epoch,
                    f"ratio.{key}": c.s_per_epoch / reference.s_per_epoch,
                    f"resolved_threads.{key}": c.threads}
    mlflow.log_metrics(metrics)
    mlflow.log_text(text, "shared_cores.txt")


def csv_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parser() -> cli.Parser:
    p = cli.parser("python -m benchmarks.shared_cores", __doc__)
    p.add_argument("--threads", default="1,2,auto", help="settings to compare (default %(default)s)")
    p.add_argument("--busy", default="0,1,2", help="busy processes beside the training (default %(default)s)")
    cli.add(p, "--epochs", int, 1, unset=2, help="epochs of each measurement (default 2)")
    cli.add(p, "--train-limit", int, 1, unset=20000, help="training images (default 20000)")
    cli.add(p, "--test-limit", int, 1, unset=2000, help="test images (default 2000)")
    cli.add(p, "--seed", int, 0, unset=1, help="the runs' seed (default 1)")
    cli.add(p, "--busy-nice", int, unset=0, help="niceness of the busy processes (default 0)")
    cli.add(p, "--settle", float, 0, unset=1.0, help="seconds between starting them and training (default 1)")
    p.add_argument("--no-track", action="store_true", help="print only, log nothing to MLflow")
    return p


def settings_and_loads(args) -> tuple[list[str], list[int]]:
    """The thread settings and the busy counts (0 added: quiet is the reference), or a ConfigError."""
    loads = sorted(set(cli.int_list("busy", args.busy, 0)) | {0})
    settings = csv_list(args.threads)
    try:
        for s in settings:
            C.from_dict({"threads": s if s == "auto" else int(s)})
    except (ValueError, C.ConfigError) as exc:
        raise C.ConfigError(f"--threads {args.threads!r}: {exc}") from None
    return settings, loads


def main(argv=None) -> list[Cell]:
    try:
        args = parser().parse_args(argv)
        settings, loads = settings_and_loads(args)
    except C.ConfigError as exc:
        cli.exit_bad_input(exc)
    reference_setting = str(T.TORCH_DEFAULT)
    if reference_setting not in settings:
        settings.append(reference_setting)  # today's default must be measured quiet
    cfg = C.replace(C.load(STAGE3), {"optim.epochs": args.epochs, "data.train_limit": args.train_limit,
                                     "data.test_limit": args.test_limit, "device": "cpu",
                                     "seed": args.seed})
    splits = make_splits(load_mnist(), train_limit=args.train_limit, test_limit=args.test_limit)
    warm = C.replace(cfg, {"optim.epochs": 1, "threads": T.TORCH_DEFAULT})
    fit(warm, make_splits(load_mnist(), train_limit=512, test_limit=256), progress=False)  # kernels built

    cores = T.usable_cores()
    print(f"{cores} usable cores, torch's default {T.TORCH_DEFAULT} threads, {args.epochs} epoch(s) of "
          f"{len(splits.train_y):,} images, busy processes at nice {args.busy_nice}")
    params = {"threads": ",".join(settings), "busy": ",".join(map(str, loads)), "epochs": args.epochs,
              "train_limit": args.train_limit, "test_limit": args.test_limit, "cores": cores,
              "torch_default_threads": T.TORCH_DEFAULT, "busy_nice": args.busy_nice}
    run = contextlib.nullcontext() if args.no_track else tracked_run(run_name="benchmark-shared-cores")
    with run:
        cells = []
        for b in loads:
            with busy_processes(b, args.busy_nice, args.settle):
                cells += [measure(cfg, splits, s, b) for s in settings]
        reference = next(c for c in cells if c.setting == reference_setting and c.busy == 0)
        text = table(cells, settings, loads, reference)
        print(text)
        if not args.no_track:
            log(cells, reference, text, params)
            print(f"logged to MLflow run {mlflow.active_run().info.run_id} ({mlflow.get_tracking_uri()})")
    return cells


if __name__ == "__main__":
    main()
