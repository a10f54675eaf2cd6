"""One configuration over several seeds, as nested runs under one parent run.

    python -m tracking.consistency experiments/stage3.yaml --seeds 5 [--first-seed 1]

The parent logs how many seeds held the config's target (test accuracy >= target.accuracy
for target.hold epochs within the run's epochs), when each hold completed, and final and best
test accuracy (mean, std, min).
"""

from __future__ import annotations

import sys

import matplotlib.pyplot as plt
import mlflow
import numpy as np

from mnist_mlflow import config as C
from tracking import cli
from tracking.lifecycle import mlflow_run, runs
from tracking.stage import SetupError, checked_setup


def seed_figure(seeds: list[int], histories: list[list[float]], target: float) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for seed, acc in zip(seeds, histories):
        ax.plot(range(1, len(acc) + 1), acc, "-o", ms=3, label=f"seed {seed}")
    ax.axhline(target, color="gray", ls=":")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", ylim=(98.5, 100), title="Test accuracy per seed")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def seed_stats(outcomes: list[runs.RunOutcome], cfg: C.RunConfig) -> dict[str, float]:
    """Over the seeds' runs: how many held, and final and best test accuracy (mean, sd, min)."""
    final = np.array([o.result.history[-1].test_accuracy for o in outcomes])
    best = np.array([o.hold.best_accuracy for o in outcomes])
    reached = [o.hold.target_reached_epoch for o in outcomes if o.hold.target_reached_epoch]
    out = {"seeds": len(outcomes), "seeds_holding": len(reached), "share_holding": len(reached) / len(outcomes),
           "final_accuracy_mean": final.mean(), "final_accuracy_std": final.std(),
           "final_accuracy_min": final.min(), "best_accuracy_mean": best.mean(),
           "best_accuracy_std": best.std(), "best_accuracy_min": best.min()}
    if reached:
        out.update(reached_epoch_mean=float(np.mean(reached)), reached_epoch_max=float(max(reached)),
                   reached_epoch_min=float(min(reached)))
    return out


def main(argv: list[str] | None = None) -> int:
    return mlflow_run.run_entry_point(lambda _parent: command(argv))


def command(argv: list[str] | None) -> int:
    """The checks, then the seeds under one parent run; returns the exit status."""
    p = cli.parser("python -m tracking.consistency", __doc__)
    p.add_argument("config", help="experiment file, e.g. experiments/stage3.yaml")
    cli.add(p, "--seeds", int, 1, unset=5, help="how many seeds (default 5)")
    cli.add(p, "--first-seed", int, 0, unset=1, help="the first seed (default 1): seeds FIRST..FIRST+N-1")
    cli.add_overrides(p, *cli.OVERRIDES)
    cli.add_experiment(p)
    try:
        args = p.parse_args(argv)
        cfg, mnist = checked_setup(args)
    except (SetupError, C.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    with runs.tracked_run(run_name=f"{cfg.stage}-consistency", tags={"stage": f"{cfg.stage}-consistency"}):
        mlflow.log_params({**C.flatten(cfg), "seeds": args.seeds, "first_seed": args.first_seed})
        outcomes = []
        for seed in seeds:
            seed_cfg = C.replace(cfg, {"seed": seed})
            outcomes.append(runs.run_training(seed_cfg, mnist=mnist, nested=True, run_name=f"seed-{seed}"))
            line = outcomes[-1].summary(seed_cfg).splitlines()
            print(f"seed {seed}: {line[1]}; {line[2]}", flush=True)
        stats = seed_stats(outcomes, cfg)
        mlflow.log_metrics(stats)
        histories = [[h.test_accuracy for h in o.result.history] for o in outcomes]
        mlflow.log_figure(seed_figure(seeds, histories, cfg.target.accuracy), "figures/seeds.png")
    print(f"{stats['seeds_holding']} of {stats['seeds']} seeds held >= {cfg.target.accuracy}% for "
          f"{cfg.target.hold} epochs within {cfg.optim.epochs} epochs")
    for k, v in stats.items():
        print(f"  {k}: {v:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
