"""Fits tune's chain into ``--total-minutes``: confirm's runs are timed on this machine first, the
search gets what is left (at most its own budget) and ends by it (``--hard-budget``).

Confirm's cost is known before the search: at most `top` + 1 candidates x seeds x precisions x
threads screening runs on the search's split, then final seeds x final precisions runs on all
60,000 images, twice when a trial wins (the base trains the same final seeds; when two sets
would leave the search under MIN_SEARCH_MINUTES, one, and confirm runs with ``--test-winner
false``), each at most the search's longest schedule (`SearchSpec.horizon`). An epoch of
each precision and thread count is timed on a slice (mnist_mlflow.timing); the estimate errs
long (every run at the longest schedule, stretched by MARGIN for a machine that slows down).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from mnist_mlflow import config as C
from mnist_mlflow import threads as T
from mnist_mlflow.data import Mnist
from mnist_mlflow.timing import PROBE_BATCHES, epoch_seconds
from tracking import cli
from tracking.confirm import PRECISIONS
from tracking.search.space import SearchSpec

TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000
OVERHEAD_MINUTES = 5.0  # the steps' process starts and data loads, the search's report, promote
# A shared machine's speed drifts: on the 2-core AMD EPYC an epoch took 25 s, then 37 s within
# the hour; confirm's estimate is stretched by this much.
MARGIN = 1.1
FINAL_SETS = 2  # the winner's final runs, and the base's on the same seeds when a trial wins
MIN_SEARCH_MINUTES = 10.0  # less would not finish the incumbent's first seed on a slow CPU


class ChainTooLong(ValueError):
    """Confirm alone would not leave the search MIN_SEARCH_MINUTES: bad input, nothing created."""


@dataclass(frozen=True)
class ChainBudget:
    total: float  # minutes, the whole chain
    search: float  # minutes given to the search
    confirm: float  # minutes, estimated
    screen_runs: int
    final_runs: int
    epochs: int  # per run, at most
    epoch_seconds: dict[str, float]  # "screen fp32 t2" -> seconds an epoch
    probe_batches: int = PROBE_BATCHES  # training batches an epoch of each probe
    test_winner: bool = True  # False: a trial that wins validation is not tested (confirm --test-winner)
    untested_why: str = ""  # why not, for the first line: asked, or two final sets did not fit

    def params(self) -> dict[str, object]:
        return {"tune.total_minutes": self.total, "tune.search_minutes": round(float(self.search), 1),
                "tune.confirm_estimate_minutes": round(self.confirm, 1),
                "tune.confirm_runs": self.screen_runs + self.final_runs,
                "tune.probe_batches": self.probe_batches, "tune.test_winner": self.test_winner,
                **{f"tune.epoch_s.{k.replace(' ', '_')}": round(v, 2) for k, v in self.epoch_seconds.items()}}

    def per_epoch(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.epoch_seconds.items())

    def line(self) -> str:
        return (f"time: {self.total:g} minutes in all; confirm's {self.screen_runs} + up to {self.final_runs} "
                f"runs of up to {self.epochs} epochs take about {self.confirm:.0f} (an epoch: {self.per_epoch()}), "
                f"so the search gets {self.search:.0f}"
                + (f"; a trial that wins validation is not tested against stage 3 on the same final "
                   f"seeds, so stage 3 stays ({self.untested_why})" if self.untested_why else ""))


def plan_chain(spec: SearchSpec, args: argparse.Namespace, mnist: Mnist,
               probe_batches: int = PROBE_BATCHES) -> ChainBudget:
    """`spec`: the search file with tune's overrides; `args`: tune's (total_minutes,
    budget_minutes, top, seeds, precisions, threads, final_seeds, final_precisions, test_winner)."""
    base, d = spec.base, spec.base.data
    screen_train = min(d.train_limit or math.inf, TRAIN_IMAGES - d.val_size)
    final_train = min(d.train_limit or math.inf, TRAIN_IMAGES)
    test = min(d.test_limit or math.inf, TEST_IMAGES)
    # as tune.check read them (it refused bad ones): lists, spaces stripped
    precisions = cli.choice_list("precisions", args.precisions, PRECISIONS)
    threads = cli.int_list("threads", args.threads, 1)
    final_precisions = cli.choice_list("final-precisions", args.final_precisions, PRECISIONS)
    final_threads = T.TORCH_DEFAULT

    seconds: dict[str, float] = {}
    screen_s = final_set_s = 0.0  # all screening; one final seed in every final precision
    screen_runs = (args.top + 1) * args.seeds  # per precision and thread count
    for p in precisions if screen_runs else ():  # --seeds 0: the search's runs, nothing to time
        for t in threads:
            s = epoch_seconds(C.replace(base, {"precision": p, "threads": t}), mnist,
                              screen_train, d.val_size + test, probe_batches)
            seconds[f"screen {p} t{t}"] = s
            screen_s += screen_runs * spec.horizon * s
    for p in final_precisions:
        s = epoch_seconds(C.replace(base, {"precision": p, "threads": final_threads}), mnist, final_train, test,
                          probe_batches)
        seconds[f"final {p} t{final_threads}"] = s
        final_set_s += spec.horizon * s

    asked = args.budget_minutes or spec.settings.budget_minutes or math.inf

    def plan(sets: int) -> tuple[float, float]:
        """(confirm's minutes, what that leaves the search) with `sets` final sets."""
        confirm = MARGIN * (screen_s + sets * args.final_seeds * final_set_s) / 60
        return confirm, args.total_minutes - confirm - OVERHEAD_MINUTES  # a shorter --budget-minutes is the user's choice

    # --top 0 (only the base) or --test-winner false: one set. Two that leave the search too
    # little: one, and a trial that wins validation is not tested against the base (it stays).
    sets = FINAL_SETS if args.top and args.test_winner else 1
    confirm, left = plan(sets)
    if sets > 1 and left < MIN_SEARCH_MINUTES and plan(1)[1] >= MIN_SEARCH_MINUTES:
        sets = 1
        confirm, left = plan(sets)
    search = min(asked, left)
    untested = ("" if not args.top else "--test-winner false" if not args.test_winner else
                "two final sets would leave the search too little; more --total-minutes tests it"
                if sets == 1 else "")
    budget = ChainBudget(args.total_minutes, search, confirm, screen_runs * len(precisions) * len(threads),
                         sets * args.final_seeds * len(final_precisions), spec.horizon, seconds,
                         probe_batches, test_winner=not untested, untested_why=untested)
    if left < MIN_SEARCH_MINUTES:
        # what confirm may take and still leave the search its minimum; the most final seeds in it
        room = args.total_minutes - OVERHEAD_MINUTES - MIN_SEARCH_MINUTES

        def most_seeds(n_sets: int) -> int:
            return math.floor((room * 60 / MARGIN - screen_s) / (n_sets * final_set_s)) if final_set_s else 0

        seeds, one_set = most_seeds(sets), most_seeds(1)
        if seeds >= 1:
            other = f", or --final-seeds {seeds} (the most that fit)" + (
                f" ({one_set} if a winner may go untested)" if one_set > seeds else "")
        elif one_set >= 1:
            other = f", or --final-seeds {one_set} (the most that fit; a winner then goes untested)"
        else:
            other = ", or fewer --seeds or --top" if room > 0 else ""
        raise ChainTooLong(
            f"--total-minutes={args.total_minutes:g} is not enough here: confirm's runs take about "
            f"{confirm:.0f} minutes on this machine ({budget.per_epoch()} an epoch), which leaves the search {max(left, 0):.0f} of the {MIN_SEARCH_MINUTES:g} it needs; "
            f"allow at least {math.ceil(confirm + OVERHEAD_MINUTES + MIN_SEARCH_MINUTES)}{other}")
    return budget
