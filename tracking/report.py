"""A results table from the tracking store: ``python -m tracking.report [--experiment NAME ...]``.

One row per finished stage run: stage, seed, precision, thread count, parameters, best and
final test accuracy, the epoch at which the 4-epoch hold of the target completed, the lowest
accuracy inside that hold, the longest hold, training seconds up to that epoch, and the run's
wall time (data, logging and model saving included); then, per precision and thread count, how
many runs held. ``--figure PATH`` draws every run's test accuracy per epoch, one panel per
precision and thread count. This is how the README's results tables and figure are produced.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.backend_bases import FigureCanvasBase
import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnist_mlflow import config as C
from mnist_mlflow.evaluation import hold_summary
from tracking import cli, tune_report
from tracking.cli import markdown


def history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def seconds_to(client: MlflowClient, run_id: str, epoch: float | None) -> str:
    """Training seconds until the epoch at which the hold completed (sum of epoch_seconds)."""
    if epoch is None:
        return "-"
    return f"{sum(history(client, run_id, 'epoch_seconds')[:int(epoch)]):.0f}"


def rows(experiments: str | list[str], stage: str | None = None) -> list[dict]:
    """Finished runs with a test history, oldest first; `curve` holds test accuracy per epoch."""
    client = MlflowClient()
    ids = []
    for name in [experiments] if isinstance(experiments, str) else experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise SystemExit(f"error: no experiment named {name!r} in {client.tracking_uri}")
        ids.append(exp.experiment_id)
    query = "attributes.status = 'FINISHED'" + (f" and tags.stage = '{stage}'" if stage else "")
    out = []
    for run in mlflow.search_runs(ids, query, order_by=["attributes.start_time ASC"], output_format="list"):
        m, p = run.data.metrics, run.data.params
        if "best_test_accuracy" not in m:
            continue
        curve = history(client, run.info.run_id, "test_accuracy")
        hold = hold_summary(curve, float(p.get("target.accuracy", 99.4)), int(p.get("target.hold", 4)))
        out.append({
            "run": run.info.run_id[:8], "stage": p.get("stage", "?"), "seed": p.get("seed", "?"),
            "precision": p.get("precision", "?"),
            "threads": p.get("threads_resolved", p.get("hw.threads", p.get("threads", "?"))),
            "params": p.get("num_params", "?"), "epochs": p.get("optim.epochs", "?"),
            "train": p.get("data.train_size", "?"),
            "best": f"{m['best_test_accuracy']:.2f}",
            "final": f"{m.get('test_accuracy', float('nan')):.2f}",
            "reached": str(hold.target_reached_epoch or "-"),
            "held_min": f"{hold.held_accuracy:.2f}" if hold.held_accuracy is not None else "-",
            "hold": str(hold.hold_epochs),
            "to_hold_s": seconds_to(client, run.info.run_id, hold.target_reached_epoch),
            "wall_s": f"{(run.info.end_time - run.info.start_time) / 1000:.0f}",
            "curve": curve,
        })
    return out


def groups(table: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Rows by (precision, threads), in that order."""
    out = defaultdict(list)
    for r in table:
        out[(r["precision"], r["threads"])].append(r)
    return dict(sorted(out.items()))


def summary(table: list[dict]) -> str:
    lines = []
    for (precision, threads), rs in groups(table).items():
        final = np.array([float(r["final"]) for r in rs])
        reached = [int(r["reached"]) for r in rs if r["reached"] != "-"]
        when = f", completed at epochs {min(reached)}-{max(reached)} (mean {np.mean(reached):.1f})" if reached else ""
        lines.append(f"{precision}, {threads} thread(s): {len(reached)} of {len(rs)} runs held{when}; "
                     f"final {final.mean():.2f} +- {final.std():.2f}% (min {final.min():.2f}%)")
    return "\n".join(lines)


def figure(table: list[dict], target: float = 99.4) -> plt.Figure:
    """Test accuracy per epoch, one line per run, one panel per (precision, threads)."""
    by = groups(table)
    cols = min(2, len(by))
    nrows = -(-len(by) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.8 * nrows), sharey=True, squeeze=False)
    for ax in axes.flat[len(by):]:
        ax.set_visible(False)
    for ax, ((precision, threads), rs) in zip(axes.flat, by.items()):
        for r in sorted(rs, key=lambda r: int(r["seed"]) if r["seed"].isdigit() else 0):
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], "-o", ms=2.5, lw=1, label=f"seed {r['seed']}")
        held = sum(r["reached"] != "-" for r in rs)
        ax.axhline(target, color="gray", ls=":")
        ax.set(xlabel="epoch", title=f"{precision}, {threads} thread(s): {held} of {len(rs)} held", ylim=(98.8, 99.8))
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    fig.tight_layout()
    return fig


def check_figure_path(path: str) -> None:
    """Before any query: savefig would fail only at the end, with a traceback."""
    kinds = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in kinds:
        raise C.ConfigError(f"--figure={path!r} is not allowed: a file name ending in one of "
                            f"{', '.join('.' + k for k in kinds)}")
    if not Path(path).parent.is_dir():
        raise C.ConfigError(f"--figure={path!r} is not allowed: its folder "
                            f"{str(Path(path).parent)!r} does not exist")


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m tracking.report", __doc__)
    p.add_argument("--experiment", action="append", help=f"repeatable (default {cli.DEFAULT_EXPERIMENT})")
    p.add_argument("--stage", default=None, help="only this stage, e.g. stage3")
    p.add_argument("--figure", default=None, help="also draw the test-accuracy curves into this PNG")
    one = p.add_mutually_exclusive_group()
    one.add_argument("--tune", default=None, metavar="RUN_ID",
                     help="instead: one tune chain's steps, trials, screening and final seeds ('latest': "
                          "the newest tune run, in --experiment or any experiment)")
    one.add_argument("--confirm", default=None, metavar="RUN_ID",
                     help="instead: one confirm run's screening, final seeds and champion ('latest': "
                          "the newest confirm run)")
    try:
        args = p.parse_args(argv)
        if args.figure:
            check_figure_path(args.figure)
        cli.check_server()
    except (C.ConfigError, MlflowException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.tune or args.confirm:
        return print_tune(args.tune or args.confirm, args.experiment, "tune" if args.tune else "confirm")
    table = rows(args.experiment or [cli.DEFAULT_EXPERIMENT], args.stage)
    print(markdown(table) or "(no finished runs)")
    if table:
        print("\n" + summary(table))
    if args.figure and table:
        try:
            figure(table).savefig(args.figure, dpi=110)
        except OSError as exc:  # e.g. a folder without write permission
            print(f"error: --figure={args.figure!r} cannot be written ({exc})", file=sys.stderr)
            return 2
        finally:
            plt.close("all")
        print(f"figure: {args.figure}")
    return 0


def print_tune(run_id: str, experiments: list[str] | None, stage: str = "tune") -> int:
    client = MlflowClient()
    try:
        ids = ([e.experiment_id for name in experiments if (e := client.get_experiment_by_name(name))]
               if experiments else [e.experiment_id for e in client.search_experiments()])
        run = tune_report.tune_run(client, ids, run_id, stage)
        print(tune_report.tune_markdown(client, run) if stage == "tune"
              else tune_report.confirm_markdown(client, run, run_id))
    except (C.ConfigError, MlflowException) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
