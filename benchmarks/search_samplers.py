"""Samplers and pruners side by side: the same search, the same time budget, cold starts.

    python -m benchmarks.search_samplers [--minutes 30] [--repeats 2] \\
        [--combos tpe:median,tpe:hyperband,gp:median,random:median] [--startup 4] [--set data.train_limit=20000]

Each combination (sampler:pruner) runs the default search file (experiments/search.yaml)
with only `search.sampler.name` and `search.pruner` changed, nothing enqueued (no stage-3
trial 0), for `--minutes`, as its own study in one storage. Repeats interleave (A1 B1 ... A2
B2 ...), so that drifting load hits every combination alike, and repeat k uses sampler seed k.
Prints, per combination: the best objective (validation hold epoch, lower is better), the
minutes to the first trial that held on validation, trials by state, epochs an hour, and
each combination's best against the first's, and the seed-to-seed noise of that best (the
spread between repeats of one combination) that a difference must exceed. The studies stay:
`--report` rebuilds the same document from the storage without training (`--out FILE` writes it,
as docs/samplers.md was written), and a rerun with another `--study-prefix` adds repeats. The same
command run again skips the studies that ran to their end and reruns one cut off.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
from pathlib import Path

import optuna
import yaml

from mnist_mlflow import config as C
from tracking import cli
from tracking.lifecycle.hardware import cpuinfo
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


def search_file(folder: Path, base: Path, sampler: str, pruner: str, startup: int | None = None) -> Path:
    """The search file with only the sampler's name (and, given, its random start-up trials) and
    the pruner replaced (not merged: a pruner's settings belong to it), still extending stage 3
    for best_config.yaml."""
    raw = C.read_file(base)
    chosen = {**raw["search"]["sampler"], "name": sampler}
    if startup is not None:
        chosen["n_startup_trials"] = startup
    raw["search"] = {**raw["search"], "sampler": chosen, "pruner": PRUNER_SETTINGS[pruner]}
    path = folder / f"search-{sampler}-{pruner}.yaml"
    path.write_text(yaml.safe_dump({C.EXTENDS: str(stage_file(base)), **raw}, sort_keys=False))
    return path


def study_name(prefix: str, sampler: str, pruner: str, repeat: int) -> str:
    return f"{prefix}-{sampler}-{pruner}-r{repeat}"


def summary(study: optuna.Study) -> dict:
    """What one study found within its budget, read from the study alone (so --report can)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start]
    start = min((t.datetime_start for t in trials), default=None)
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    held = [t for t in trials if t.user_attrs.get(N.VAL_HOLD_EPOCH) and t.datetime_complete]
    first = min(((t.datetime_complete - start).total_seconds() / 60 for t in held), default=None)
    best = report.best_trial(study)
    return {"best": best.value if best is not None else None, "best_trial": best.number if best is not None else None,
            "first_hold_min": first,
            "span_min": (max(ends) - start).total_seconds() / 60 if ends else None,
            **report.counts(study), **report.throughput(study)}


def proxy(study: optuna.Study) -> str:
    """The data a study's trials trained on (a cheaper proxy shows here)."""
    for t in study.get_trials(deepcopy=False):
        cfg = t.user_attrs.get(N.CONFIG) or {}
        if cfg:
            limit = cfg.get("data.train_limit")
            return (f"{cfg.get('data.val_size')} validation images, "
                    f"{'all other' if not limit else limit} training images, test_limit {cfg.get('data.test_limit')}")
    return "unknown (no trial)"


def collect(storage: str, prefix: str, combos: list[tuple[str, str]], repeats: int) -> tuple[dict, str]:
    """Each combination's studies already in `storage` (repeats 1..repeats; missing ones skipped)."""
    names = set(optuna.get_all_study_names(storage))
    out: dict[tuple[str, str], list[dict]] = {c: [] for c in combos}
    data = "unknown (no study)"
    for sampler, pruner in combos:
        for k in range(1, repeats + 1):
            name = study_name(prefix, sampler, pruner, k)
            if name in names:
                study = optuna.load_study(study_name=name, storage=storage)
                out[(sampler, pruner)].append(summary(study))
                data = proxy(study)
    return out, data


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m benchmarks.search_samplers", __doc__)
    p.add_argument("--config", default=str(cli.ROOT / DEFAULT_CONFIG), help="search file (default: the repository's %(default)s)")
    p.add_argument("--combos", default=COMBOS, help="sampler:pruner,... (default %(default)s)")
    cli.add(p, "--minutes", float, 0, unset=30.0, help="each study's budget (default 30)")
    cli.add(p, "--repeats", int, 1, unset=1, help="studies per combination (default 1)")
    cli.add(p, "--workers", int, 1, help="worker processes (default: the file's, 2)")
    cli.add(p, "--n-trials", int, 1, help="a cap on each study's trials (default: the file's)")
    cli.add(p, "--startup", int, 1, help="the samplers' random start-up trials (default: the file's, 8): "
            "a study shorter than them compares no sampler, since pairs of one repeat share their seed")
    p.add_argument("--storage", default="sqlite:///samplers.db", help="Optuna storage (default %(default)s)")
    p.add_argument("--study-prefix", default="samplers", help="studies are <prefix>-<sampler>-<pruner>-r<k>")
    cli.add_overrides(p, "epochs", "train_limit", "test_limit",
                      set_help="run-config override for every trial (a cheaper proxy, e.g. data.train_limit=20000)")
    p.add_argument("--experiment", default="search-samplers", help="MLflow experiment (default %(default)s)")
    p.add_argument("--report", action="store_true", help="train nothing: the document from the studies in --storage")
    p.add_argument("--out", default=None, help="also write the document (markdown) to this file")
    try:
        a = p.parse_args(argv)
        combos = parse_combos(a.combos)
    except C.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.report and a.storage.startswith("sqlite:///") and not Path(a.storage.removeprefix("sqlite:///")).exists():
        print(f"error: --storage {a.storage!r}: no such file", file=sys.stderr)
        return 2
    if not a.report:
        run_studies(a, combos)
    out, data = collect(a.storage, a.study_prefix, combos, a.repeats)
    if not any(out.values()):
        print(f"error: no study {study_name(a.study_prefix, *combos[0], 1)!r} (or of the other pairs) "
              f"in {a.storage}", file=sys.stderr)
        return 2
    text = document(out, data, argv if argv is not None else sys.argv[1:])
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


DONE = "samplers_benchmark_done"  # a study attribute: it ran to its end


def finished(storage: str, name: str) -> bool:
    """Whether study `name` ran to its end (a rerun skips it); one cut off (its machine stopped)
    is deleted, to run again from nothing."""
    if name not in optuna.get_all_study_names(storage):
        return False
    study = optuna.load_study(study_name=name, storage=storage)
    if study.user_attrs.get(DONE):
        return True
    print(f"{name}: cut off ({len(study.trials)} trials); run again", flush=True)
    optuna.delete_study(study_name=name, storage=storage)
    return False


def run_studies(a, combos: list[tuple[str, str]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for k in range(1, a.repeats + 1):
            for sampler, pruner in combos:
                name = study_name(a.study_prefix, sampler, pruner, k)
                if finished(a.storage, name):
                    print(f"{name}: already in {a.storage}, skipped", flush=True)
                    continue
                cfg = search_file(Path(folder), Path(a.config), sampler, pruner, a.startup)
                opts = Options(config=str(cfg), storage=a.storage, study_name=name,
                               budget_minutes=a.minutes, enqueue_base=False, sampler_seed=k,
                               workers=a.workers, n_trials=a.n_trials, experiment=a.experiment,
                               epochs=a.epochs, train_limit=a.train_limit, test_limit=a.test_limit,
                               overrides=tuple(o for item in a.overrides for o in item.split()))
                study = run_search(opts).study
                study.set_user_attr(DONE, True)
                print(f"{sampler}:{pruner} repeat {k}: {summary(study)}", flush=True)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def noise(out: dict[tuple[str, str], list[dict]]) -> tuple[float | None, int]:
    """The pooled sd of one study's best objective between repeats of one combination (its
    seed-to-seed noise), and its degrees of freedom; None with fewer than 2 repeats anywhere."""
    squares, dof = 0.0, 0
    for rows in out.values():
        values = [r["best"] for r in rows if r["best"] is not None]
        if len(values) >= 2:
            mean = statistics.fmean(values)
            squares += sum((v - mean) ** 2 for v in values)
            dof += len(values) - 1
    return (math.sqrt(squares / dof), dof) if dof else (None, 0)


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def document(out: dict[tuple[str, str], list[dict]], data: str, argv: list[str]) -> str:
    """The markdown: the command, the CPU, per-study rows, the summary table and the noise."""
    model, _ = cpuinfo()
    lines = [f"<!-- generated: python -m benchmarks.search_samplers --report {' '.join(a for a in argv if a != '--report')} -->",
             "# Samplers and pruners side by side", "",
             f"Cold-start studies of experiments/search.yaml (only the sampler and pruner changed), "
             f"two 1-thread workers each, on real MNIST: {data}. CPU: {model or 'unknown'}. "
             "Objective: the validation hold epoch (lower is better; never held: the horizon + 1 + "
             "the points short).", "",
             "| sampler:pruner | repeat | best | best trial | first hold (min) | trials | COMPLETE | PRUNED | STOPPED | "
             "REJECTED | FAIL | epochs | epochs/h | span (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (sampler, pruner), rows in out.items():
        for k, r in enumerate(rows, 1):
            lines.append(f"| {sampler}:{pruner} | {k} | {_num(r['best'])} | {'-' if r.get('best_trial') is None else r['best_trial']} | "
                         f"{_num(r['first_hold_min'], 0)} | "
                         f"{sum(r[s] for s in N.STATES)} | "
                         + " | ".join(str(r[s]) for s in (N.COMPLETE, N.PRUNED, N.STOPPED, N.REJECTED, N.FAIL))
                         + f" | {r['epochs_trained']} | {_num(r.get('epochs_per_hour'), 0)} | {_num(r['span_min'], 1)} |")
    lines += ["", *table(out), ""]
    sd, dof = noise(out)
    if sd is None:
        lines.append("Noise: one study per combination, so no difference between them can be told from noise.")
    else:
        bars = "; ".join(f"of {n} {'study' if n == 1 else 'studies'} each, more than 1.96 x sd x sqrt(2/{n}) = "
                         f"{1.96 * sd * math.sqrt(2 / n):.2f}" for n in sorted({len(rows) for rows in out.values() if rows}))
        lines.append(f"Noise: one study's best objective varies between repeats with a pooled sd of {sd:.2f} "
                     f"({dof} degrees of freedom); two means differ beyond it when apart, {bars}.")
    return "\n".join(lines)


def table(out: dict[tuple[str, str], list[dict]]) -> list[str]:
    first = _mean([r["best"] for r in next(iter(out.values()))])
    lines = ["| sampler:pruner | studies | best objective (mean) | vs first | first hold (min) | "
             "trials | PRUNED | STOPPED | REJECTED | epochs/h |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (sampler, pruner), rows in out.items():
        if not rows:
            continue
        best, hold = _mean([r["best"] for r in rows]), _mean([r["first_hold_min"] for r in rows])
        ratio = f"{best / first:.3f}" if best is not None and first else "-"
        cells = [f"{sampler}:{pruner}", len(rows), _num(best), ratio, _num(hold, 0),
                 f"{_mean([sum(r[s] for s in N.STATES) for r in rows]):.1f}",
                 *(f"{_mean([r[s] for r in rows]):.1f}" for s in (N.PRUNED, N.STOPPED, N.REJECTED)),
                 f"{_mean([r.get('epochs_per_hour') for r in rows]) or 0:.0f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
