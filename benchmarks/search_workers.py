"""Wall-clock of one shared search run by 1 worker against K workers, for the same trials.

    python -m benchmarks.search_workers --storage postgresql://.../optuna \\
        --tracking-uri http://127.0.0.1:5000 [--trials 9] [--workers 3]

Each side is a fresh study of `--trials` finished trials on tiny data (the team test's
settings), run by worker processes started exactly as on worker machines
(`python -m tracking.search --study-trials N`), one side after the other. Torch threads per
worker: the machine's cores divided by the workers (at least 1), as `--workers K` does.
Prints both times and the ratio.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mnist_mlflow import config as C
from tracking import cli

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--epochs", "2", "--train-limit", "1000", "--test-limit", "300", "--set", "data.val_size=300",
        "--set", "device=cpu", "--sampler-seed", "0", "--heartbeat", "10"]


def run_side(workers: int, trials: int, storage: str, tracking_uri: str, tag: str) -> float:
    """Seconds from starting `workers` processes on a fresh study to the last one's exit."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": str(max(1, (cores or 1) // workers))}
    env.pop("MLFLOW_RUN_ID", None)
    cmd = [sys.executable, "-m", "tracking.search", "--config", str(ROOT / "experiments/search.yaml"),
           "--storage", storage, "--study-name", f"bench-{tag}-{workers}w", "--study-trials",
           str(trials), "--experiment", "search-workers-benchmark", "--workers", "1", *TINY]
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(workers)]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a worker failed (exit {p.returncode}):\n{err[-3000:]}")
    return time.monotonic() - start


def parser() -> cli.Parser:
    p = cli.parser("python -m benchmarks.search_workers", __doc__)
    p.add_argument("--storage", required=True, help="Optuna RDB storage shared by the workers")
    p.add_argument("--tracking-uri", required=True, help="MLflow tracking server (or store)")
    cli.add(p, "--trials", int, 1, unset=9, help="finished trials of each side (default 9)")
    cli.add(p, "--workers", int, 2, unset=3, help="worker processes of the second side (default 3)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        a = parser().parse_args(argv)
    except C.ConfigError as exc:
        cli.exit_bad_input(exc)
    tag = time.strftime("%Y%m%d-%H%M%S")
    one = run_side(1, a.trials, a.storage, a.tracking_uri, tag)
    many = run_side(a.workers, a.trials, a.storage, a.tracking_uri, tag)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{a.trials} finished trials each, {cores} CPU cores on this machine")
    print(f"  1 worker:  {one:7.1f} s")
    print(f"  {a.workers} workers: {many:7.1f} s")
    print(f"  speed-up (1 worker / {a.workers} workers): {one / many:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
