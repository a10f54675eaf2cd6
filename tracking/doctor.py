"""Finds RUNNING runs whose process is gone and, with ``--fix``, ends them FAILED with the reason.

    python -m tracking.doctor [--fix] [--experiment NAME] [--stale-after SECONDS]

A run is judged by the rule of tracking/lifecycle/liveness.py: on its own host by its pid, from any
host by its heartbeat (older than --stale-after, default 600 s, means gone). Live runs, and runs
without an owner record (older code, other tools), are listed and never touched. A run is
judged again just before it is marked, so one that ended or was resumed meanwhile is left alone.

Exit codes: 0 no dead run left RUNNING (none found, or all fixed); 1 dead runs found and not
fixed (no --fix); 2 bad arguments or an unreachable store.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Optional

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException

from mnist_mlflow import config as C
from tracking import cli
from tracking.lifecycle import liveness


def running_runs(experiment: Optional[str]) -> list[Run]:
    """RUNNING runs, oldest first, of `experiment` or of every experiment (deleted ones too)."""
    if experiment:
        exp = mlflow.get_experiment_by_name(experiment)
        if exp is None:
            raise MlflowException(f"--experiment {experiment!r} does not exist")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in mlflow.search_experiments(view_type=ViewType.ALL)]
    if not ids:  # mlflow.search_runs would search the active experiment instead
        return []
    return mlflow.search_runs(ids, "attributes.status = 'RUNNING'", run_view_type=ViewType.ALL,
                              order_by=["attributes.start_time ASC"], output_format="list")


def mark_failed(client: MlflowClient, run_id: str, stale_s: float) -> Optional[liveness.Verdict]:
    """Ends the run FAILED if it is still RUNNING and still dead; returns the verdict it acted on."""
    run = client.get_run(run_id)  # fresh: it may have finished or been resumed since the listing
    verdict = liveness.judge(run, stale_s)
    if run.info.status != "RUNNING" or not verdict.dead:
        return None
    client.set_tag(run_id, "error", f"tracking.doctor: {verdict.reason}")
    client.set_tag(run_id, "doctor.marked_at", f"{time.time():.3f}")
    end = verdict.last_heartbeat or time.time()  # the last sign of life, when there is one
    client.set_terminated(run_id, "FAILED", end_time=int(end * 1000))
    return verdict


def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m tracking.doctor", __doc__)
    p.add_argument("--fix", action="store_true", help="end the dead runs FAILED, with the reason")
    p.add_argument("--experiment", default="", help="only this experiment (default: all)")
    cli.add(p, "--stale-after", float, unset=liveness.STALE_S, metavar="SECONDS",
            help=f"a heartbeat older than this means the owner is gone (default {liveness.STALE_S:g})")
    try:
        args = p.parse_args(argv)
        if not (math.isfinite(args.stale_after) and args.stale_after > 0):  # nan passes `<= 0`
            raise C.ConfigError(f"--stale-after={args.stale_after:g} is not allowed: "
                                "a finite number of seconds, more than 0")
        cli.check_server()
        client = MlflowClient()
        found = [(run, liveness.judge(run, args.stale_after))
                 for run in running_runs(args.experiment or None)]
        dead = [run for run, v in found if v.dead]
        for run, v in found:
            print(f"{v.state:<7} {run.info.run_id}  {run.info.run_name or '-'}: {v.reason}")
        fixed = 0
        if args.fix:
            for run in dead:
                if mark_failed(client, run.info.run_id, args.stale_after) is not None:
                    fixed += 1
                    print(f"marked FAILED: {run.info.run_id}")
    except (C.ConfigError, MlflowException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    alive = sum(v.alive for _, v in found)
    unknown = sum(v.state == "unknown" for _, v in found)
    print(f"{len(found)} RUNNING: {alive} alive, {len(dead)} dead"
          + (f" ({fixed} marked FAILED)" if args.fix else "")
          + (f", {unknown} without an owner record (left alone)" if unknown else ""))
    if dead and not args.fix:
        print("run again with --fix to end the dead ones FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
