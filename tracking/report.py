"""A results table from the tracking store: ``python -m tracking.report [--experiment NAME]``.

One row per finished stage run: stage, seed, parameters, best test accuracy, the epoch at
which the 4-epoch hold of the target completed, the longest hold, training seconds up to
that epoch, and the run's wall time (data, logging and model saving included). This is
how the README's results table is produced.
"""

from __future__ import annotations

import sys

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnist_mlflow import config as C
from tracking import cli


def seconds_to(client: MlflowClient, run_id: str, epoch: float | None) -> str:
    """Training seconds until the epoch at which the hold completed (sum of epoch_seconds)."""
    if epoch is None:
        return "-"
    history = client.get_metric_history(run_id, "epoch_seconds")
    return f"{sum(m.value for m in history if m.step <= epoch):.0f}"


def rows(experiment: str, stage: str | None = None) -> list[dict]:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment named {experiment!r} in {client.tracking_uri}")
    query = "attributes.status = 'FINISHED'" + (f" and tags.stage = '{stage}'" if stage else "")
    out = []
    for run in client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time ASC"]):
        m, p = run.data.metrics, run.data.params
        if "best_test_accuracy" not in m:
            continue
        out.append({
            "run": run.info.run_id[:8], "stage": p.get("stage", "?"), "seed": p.get("seed", "?"),
            "params": p.get("num_params", "?"), "epochs": p.get("optim.epochs", "?"),
            "train": p.get("data.train_size", "?"),
            "best": f"{m['best_test_accuracy']:.2f}",
            "final": f"{m.get('test_accuracy', float('nan')):.2f}",
            "reached": str(int(m["target_reached_epoch"])) if "target_reached_epoch" in m else "-",
            "hold": str(int(m["hold_epochs"])),
            "to_hold_s": seconds_to(client, run.info.run_id, m.get("target_reached_epoch")),
            "wall_s": f"{(run.info.end_time - run.info.start_time) / 1000:.0f}",
        })
    return out


def markdown(table: list[dict]) -> str:
    # by hand: pandas' DataFrame.to_markdown needs `tabulate`, not a dependency, for these 4 lines
    if not table:
        return "(no finished runs)"
    head = list(table[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m tracking.report", __doc__)
    p.add_argument("--experiment", default=cli.DEFAULT_EXPERIMENT)
    p.add_argument("--stage", default=None, help="only this stage, e.g. stage3")
    try:
        args = p.parse_args(argv)
        cli.check_server()
    except (C.ConfigError, MlflowException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown(rows(args.experiment, args.stage)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
