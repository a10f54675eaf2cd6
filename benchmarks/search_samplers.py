"""Samplers and pruners side by side: the same search, the same time budget, cold starts.

    python -m benchmarks.search_samplers [--minutes 30] [--repeats 2] \\
        [--combos tpe:median,tpe:hyperband,gp:median,random:median] [--set data.train_limit=20000]

Each combination (sampler:pruner) runs the default search file (experiments/search.yaml)
with only `search.sampler.name` and `search.pruner` changed, nothing enqueued (no stage-3
trial 0), for `--minutes`, as its own study in one storage. Repeats interleave (A1 B1 ... A2
B2 ...), so that drifting load hits every combination alike, and repeat k uses sampler seed k.
Prints, per combination: the best objective (validation hold epoch, lower is better), the
minutes to the first trial that held on validation, trials by state, epochs an hour, and
each combination's best against the first's. The study stays: a rerun of the same command
with another `--study-prefix` adds repeats; `tracking.report` reads the runs.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from mnist_mlflow import config as C
from tracking import cli
from tracking.search import names as N
from tracking.search import report
from tracking.search.plan import DEFAULT_CONFIG, Options
from tracking.search.run import run_search
from tracking.search.space import SAMPLERS, stage_file

COMBOS = "tpe:median,tpe:hyperband,gp:median,random:median"
PRUNER_SETTINGS = {  # from epoch 4, as search.yaml's median pruner
    "median": {"name": "median", "n_startup_trials": 4, "n_warmup_steps": 4},
    "hyperband": {"name": "hyperband", "min_resource": 4, "reduction_factor": 3},
    "none": {"name": "none"},
}


def parse_combos(text: str) -> list[tuple[str, str]]:
    combos = []
    for item in text.split(","):
        sampler, _, pruner = item.strip().partition(":")
        if sampler not in SAMPLERS or pruner not in PRUNER_SETTINGS:
            raise C.ConfigError(f"--combos: {item!r} is not sampler:pruner with a sampler in "
                                 f"{', '.join(SAMPLERS)} and a pruner in {', '.join(PRUNER_SETTINGS)}")
        combos.append((sampler, pruner))
    return combos


def search_file(folder: Path, base: Path, sampler: str, pruner: str) -> Path:
    """The search file with only the sampler's name and the pruner replaced (not merged: a
    pruner's settings belong to it), still extending stage 3 for best_config.yaml."""
    raw = C.read_file(base)
    raw["search"] = {**raw["search"], "sampler": {**raw["search"]["sampler"], "name": sampler},
                     "pruner": PRUNER_SETTINGS[pruner]}
    path = folder / f"search-{sampler}-{pruner}.yaml"
    path.write_text(yaml.safe_dump({C.EXTENDS: str(stage_file(base)), **raw}, sort_keys=False))
    return path


def summary(result) -> dict:
    """What one study found within its budget."""
    trials = [t for t in result.study.get_trials(deepcopy=False) if t.datetime_start]
    start = min((t.datetime_start for t in trials), default=None)
    held = [t for t in trials if t.user_attrs.get(N.VAL_HOLD_EPOCH) and t.datetime_complete]
    first = min(((t.datetime_complete - start).total_seconds() / 60 for t in held), default=None)
    best = result.best
    return {"best": best.value if best is not None else None, "first_hold_min": first,
            **result.counts, **report.throughput(result.study)}


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m benchmarks.search_samplers", __doc__)
    p.add_argument("--config", default=str(cli.ROOT / DEFAULT_CONFIG), help="search file (default: the repository's %(default)s)")
    p.add_argument("--combos", default=COMBOS, help="sampler:pruner,... (default %(default)s)")
    cli.add(p, "--minutes", float, 0, unset=30.0, help="each study's budget (default 30)")
    cli.add(p, "--repeats", int, 1, unset=1, help="studies per combination (default 1)")
    cli.add(p, "--workers", int, 1, help="worker processes (default: the file's, 2)")
    cli.add(p, "--n-trials", int, 1, help="a cap on each study's trials (default: the file's)")
    p.add_argument("--storage", default="sqlite:///samplers.db", help="Optuna storage (default %(default)s)")
    p.add_argument("--study-prefix", default="samplers", help="studies are <prefix>-<sampler>-<pruner>-r<k>")
    cli.add_overrides(p, "epochs", "train_limit", "test_limit",
                      set_help="run-config override for every trial (a cheaper proxy, e.g. data.train_limit=20000)")
    p.add_argument("--experiment", default="search-samplers", help="MLflow experiment (default %(default)s)")
    try:
        a = p.parse_args(argv)
        combos = parse_combos(a.combos)
    except C.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out: dict[tuple[str, str], list[dict]] = {c: [] for c in combos}
    with tempfile.TemporaryDirectory() as folder:
        for k in range(1, a.repeats + 1):
            for sampler, pruner in combos:
                cfg = search_file(Path(folder), Path(a.config), sampler, pruner)
                opts = Options(config=str(cfg), storage=a.storage, study_name=f"{a.study_prefix}-{sampler}-{pruner}-r{k}",
                               budget_minutes=a.minutes, enqueue_base=False, sampler_seed=k,
                               workers=a.workers, n_trials=a.n_trials, experiment=a.experiment,
                               epochs=a.epochs, train_limit=a.train_limit, test_limit=a.test_limit,
                               overrides=tuple(o for item in a.overrides for o in item.split()))
                out[(sampler, pruner)].append(summary(run_search(opts)))
                print(f"{sampler}:{pruner} repeat {k}: {out[(sampler, pruner)][-1]}", flush=True)
    print_table(out)
    return 0


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def print_table(out: dict[tuple[str, str], list[dict]]) -> None:
    first = _mean([r["best"] for r in next(iter(out.values()))])
    print("| sampler:pruner | studies | best objective (mean) | vs first | first hold (min) | "
          "trials | PRUNED | STOPPED | REJECTED | epochs/h |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (sampler, pruner), rows in out.items():
        best, hold = _mean([r["best"] for r in rows]), _mean([r["first_hold_min"] for r in rows])
        ratio = f"{best / first:.3f}" if best is not None and first else "-"
        cells = [f"{sampler}:{pruner}", len(rows), "-" if best is None else f"{best:.2f}", ratio,
                 "-" if hold is None else f"{hold:.0f}",
                 f"{_mean([sum(r[s] for s in N.STATES) for r in rows]):.1f}",
                 *(f"{_mean([r[s] for r in rows]):.1f}" for s in (N.PRUNED, N.STOPPED, N.REJECTED)),
                 f"{_mean([r.get('epochs_per_hour') for r in rows]) or 0:.0f}"]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    sys.exit(main())
