"""Time to target: seconds from a run's start (data load included) to the epoch at which its
4-epoch hold of >= 99.4 % test accuracy completes, for several pipelines side by side in one process.

Each variant trains with rotation +-6.9 deg, Adam + OneCycle and batch 128, and stops at its hold
or at its last epoch. Models are built as a stage run builds them (normalized with the training
images' statistics, initial weights from the seed), so `stage3` trains exactly what
`mlflow run . -e stage3 -P seed=N` trains, without its tracking:

  notebook       the notebook pipeline: per-sample Dataset + v2.RandomRotation + DataLoader,
                 the model before the speed work (TinyNet 9/16, nn.Dropout), no shift, test set
                 through a DataLoader
  baseline       the same DataLoader pipeline (v2.RandomAffine for the shift) with the model and
                 augmentation of experiments/stage3.yaml
  tensors        the project's pipeline (uint8 tensors in memory, whole-batch rotation), old model
  sparse         + dropout masks that draw only the dropped positions (SparseMaskDropout)
  channels-last  + ChannelsLastConv2d and ChannelsLastMaxPool2d (oneDNN convolutions and pooling
                 channels-last), fp32, no weight average
  pool-first     + pooling before block 2's BatchNorm, ReLU and dropout (a quarter of their work)
  stage3         + evaluation through the weights' moving average, OneCycle peak 0.015, a fourth
                 3x3 convolution with narrower widths (7,814 parameters), a random shift of up
                 to 1.5 px: experiments/stage3.yaml

Variants of retired options (LeanNet, the words16 and channel masks) are in git tag
retired-variants.

Prints a table (s/epoch, epochs to hold, time to hold, training MFLOP per image from
torch.utils.flop_counter, achieved GFLOP/s) and logs one MLflow run with a child per variant.

    python -m benchmarks.time_to_hold                      # stage3,baseline
    python -m benchmarks.time_to_hold --variants tensors,sparse,channels-last,pool-first,stage3 --epochs 2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2

from mnist_mlflow import config as C
from mnist_mlflow import threads as T
from mnist_mlflow.data import load_mnist, make_splits
from mnist_mlflow.evaluation import hold_summary
from mnist_mlflow.models import build_model, count_params
from mnist_mlflow.train import (fit, init_model, make_autocast, make_ema, make_optimizer, make_scheduler,
                                train_step)
from tracking import cli
from tracking.lifecycle.runs import tracked_run

STAGE3 = Path(__file__).resolve().parent.parent / "experiments/stage3.yaml"
# the stage-3 model and recipe before the speed work (7,759 parameters, no shift)
BEFORE = {"model.arch": "tiny", "model.width1": 9, "model.width2": 16, "model.width_transition": None,
          "model.width3": None, "model.width4": None, "model.width5": None, "model.width6": None,
          "augment.translate_px": 0.0, "model.dropout_mask": "bernoulli",
          "model.channels_last_conv": False, "model.pool_before_bn": False, "precision": "fp32",
          "optim.epochs": 15, "optim.batch_size": 128, "optim.ema_decay": None,
          "schedule.max_lr": 0.01}
VARIANTS = {  # name -> (pipeline, config overrides of experiments/stage3.yaml, description)
    "notebook": ("loader", BEFORE, "DataLoader + per-sample v2.RandomRotation, TinyNet, nn.Dropout"),
    "baseline": ("loader", {}, "DataLoader + per-sample v2.RandomAffine (rotation, shift), stage 3's model"),
    "tensors": ("tensors", BEFORE, "in-memory uint8 tensors + whole-batch rotation, TinyNet"),
    "sparse": ("tensors", {**BEFORE, "model.dropout_mask": "sparse"}, "+ sparse dropout mask"),
    "channels-last": ("tensors", {**BEFORE, "model.dropout_mask": "sparse", "model.channels_last_conv": True},
                      "+ channels-last convolutions and pooling"),
    "pool-first": ("tensors", {**BEFORE, "model.dropout_mask": "sparse", "model.channels_last_conv": True,
                               "model.pool_before_bn": True}, "+ pooling before BN, ReLU, dropout"),
    "stage3": ("tensors", {}, "+ weight average, peak 0.015, fourth 3x3 conv, shift: experiments/stage3.yaml"),
}
DEFAULT_VARIANTS = "stage3,baseline"


@dataclass
class Outcome:
    name: str
    params: int
    accuracies: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    elapsed: list[float] = field(default_factory=list)  # since the start, data load included
    train_gflop_per_image: float = 0.0

    def hold(self, cfg: C.RunConfig):
        return hold_summary(self.accuracies, cfg.target.accuracy, cfg.target.hold)

    def time_to_hold(self, cfg: C.RunConfig) -> float | None:
        h = self.hold(cfg)
        return self.elapsed[h.target_reached_epoch - 1] if h.target_reached_epoch else None


def train_gflop_per_image(cfg: C.RunConfig) -> float:
    """Multiply-adds x 2 of one forward and backward pass (convolutions and matmuls)."""
    model, batch = build_model(cfg.model), 128
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(torch.zeros(batch, 1, 28, 28)), torch.zeros(batch, dtype=torch.long)).backward()
    return counter.get_total_flops() / batch / 1e9


class PerSampleMnist(Dataset):
    """The classic notebook pipeline: one image at a time through torchvision transforms."""

    def __init__(self, images, labels, degrees: float, translate_px: float = 0.0):
        self.images, self.labels = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)
        # v2.RandomAffine rounds its shift to whole pixels (the project's shift is sub-pixel)
        geometry = (v2.RandomAffine(degrees, translate=(translate_px / 28, translate_px / 28)) if translate_px
                    else v2.RandomRotation(degrees))
        self.transform = v2.Compose([geometry, v2.ToDtype(torch.float32)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def run_loader(cfg: C.RunConfig, out: Outcome, t0: float) -> None:
    splits = make_splits(load_mnist(), train_limit=cfg.data.train_limit, test_limit=cfg.data.test_limit)
    model, _, _ = init_model(cfg, splits.train_x)
    train = DataLoader(PerSampleMnist(splits.train_x, splits.train_y, cfg.augment.rotation_degrees,
                                      cfg.augment.translate_px),
                       batch_size=cfg.optim.batch_size, shuffle=True)
    test = DataLoader(PerSampleMnist(splits.test_x, splits.test_y, 0.0), batch_size=1000)
    opt = make_optimizer(model, cfg)
    sched, per_batch = make_scheduler(opt, cfg, len(train))
    ema = make_ema(model, cfg.optim.ema_decay)  # the same recipe as the project's pipeline
    evaluated = ema.module if ema is not None else model
    autocast = make_autocast(cfg, torch.device("cpu"))
    for _ in range(cfg.optim.epochs):
        start = time.perf_counter()
        model.train()
        for xb, yb in train:
            train_step(model, xb, yb, opt, sched if per_batch else None, autocast,
                       cfg.optim.label_smoothing)
            if ema is not None:
                ema.update_parameters(model)
        evaluated.eval()
        with torch.no_grad():
            correct = sum((evaluated(xb).argmax(1) == yb).sum().item() for xb, yb in test)
        evaluated.train()
        if record(out, cfg, 100.0 * correct / len(splits.test_y), start, t0):
            return


def run_project(cfg: C.RunConfig, out: Outcome, t0: float) -> None:
    splits = make_splits(load_mnist(), train_limit=cfg.data.train_limit, test_limit=cfg.data.test_limit)
    starts = [time.perf_counter()]

    def on_epoch(m) -> bool:
        stop = record(out, cfg, m.test_accuracy, starts[-1], t0)
        starts.append(time.perf_counter())
        return stop

    model, _, _ = init_model(cfg, splits.train_x)  # as a stage run: the same run for the same seed
    fit(cfg, splits, on_epoch_end=on_epoch, progress=False, model=model)


def record(out: Outcome, cfg: C.RunConfig, accuracy: float, start: float, t0: float) -> bool:
    """Notes one epoch; True once the hold is complete."""
    now = time.perf_counter()
    out.accuracies.append(accuracy)
    out.epoch_seconds.append(now - start)
    out.elapsed.append(now - t0)
    print(f"  {out.name:<14} epoch {len(out.accuracies):2d}  test {accuracy:6.2f} %  "
          f"{now - start:5.1f} s  elapsed {now - t0:6.1f} s", flush=True)
    return out.hold(cfg).target_reached_epoch is not None


def measure(name: str, base: C.RunConfig, forced: dict) -> tuple[C.RunConfig, Outcome]:
    pipeline, overrides, _ = VARIANTS[name]
    cfg = C.replace(base, {**overrides, **forced})
    out = Outcome(name, count_params(build_model(cfg.model)), train_gflop_per_image=train_gflop_per_image(cfg))
    T.apply(cfg.threads)  # fit applies it too; the DataLoader pipeline trains without fit
    t0 = time.perf_counter()
    (run_loader if pipeline == "loader" else run_project)(cfg, out, t0)
    return cfg, out


def table(results: list[tuple[C.RunConfig, Outcome]], n_train: int) -> str:
    lines = [f"{'variant':<14} {'params':>6} {'s/epoch':>8} {'epochs to hold':>15} {'time to hold':>13} "
             f"{'MFLOP/img':>10} {'GFLOP/s':>8}  pipeline"]
    for cfg, o in results:
        per_epoch = sum(o.epoch_seconds) / len(o.epoch_seconds)
        h, t = o.hold(cfg), o.time_to_hold(cfg)
        held = f"{h.target_reached_epoch}" if t else f"not in {len(o.accuracies)}"
        gflops = o.train_gflop_per_image * n_train / per_epoch
        lines.append(f"{o.name:<14} {o.params:>6,} {per_epoch:>8.1f} {held:>15} "
                     f"{(f'{t:.0f} s' if t else '-'):>13} {o.train_gflop_per_image * 1e3:>10.2f} "
                     f"{gflops:>8.1f}  {VARIANTS[o.name][2]}")
    per_epoch = {o.name: sum(o.epoch_seconds) / len(o.epoch_seconds) for _, o in results}
    refs = ("notebook", "baseline")
    for ref in refs:
        others = [name for name in per_epoch if name not in refs]
        if ref in per_epoch and others:
            lines.append(f"speed per epoch vs {ref}: " + ", ".join(
                f"{name} {per_epoch[ref] / per_epoch[name]:.2f}x" for name in others))
    return "\n".join(lines)


def log(results, text: str, args) -> None:
    with tracked_run(run_name="benchmark-time-to-hold") as parent:  # adopts `mlflow run`'s run
        mlflow.set_tag("benchmark", "time_to_hold")
        mlflow.log_params({"variants": ",".join(o.name for _, o in results), "epochs": args.epochs or "",
                           "train_limit": args.train_limit, "torch_threads": results[0][0].threads})
        mlflow.log_text(text, "time_to_hold.txt")
        for cfg, o in results:
            with tracked_run(run_name=f"benchmark-{o.name}", nested=True):
                mlflow.log_params({"variant": o.name, "pipeline": VARIANTS[o.name][0],
                                   "description": VARIANTS[o.name][2], "params": o.params,
                                   **C.flatten(cfg)})
                for epoch, (acc, sec, el) in enumerate(zip(o.accuracies, o.epoch_seconds, o.elapsed), 1):
                    mlflow.log_metrics({"test_accuracy": acc, "epoch_seconds": sec, "elapsed_seconds": el},
                                       step=epoch)
                h, t = o.hold(cfg), o.time_to_hold(cfg)
                summary = {"s_per_epoch": sum(o.epoch_seconds) / len(o.epoch_seconds),
                           "train_gflop_per_image": o.train_gflop_per_image, "held": float(t is not None)}
                if t is not None:
                    summary |= {"time_to_hold_s": t, "epochs_to_hold": h.target_reached_epoch}
                mlflow.log_metrics(summary)
        print(f"logged to MLflow run {parent.info.run_id} ({mlflow.get_tracking_uri()})")


def threads_setting(value: str) -> int | str:
    if value.strip() in ("", T.AUTO):  # `mlflow run` passes unset parameters as ""
        return T.AUTO
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--threads={value!r} is not allowed: a positive count or auto")
    return int(value)


def parser() -> cli.Parser:
    p = cli.parser("python -m benchmarks.time_to_hold", __doc__)
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    cli.add(p, "--epochs", int, 1, help="every variant's optim.epochs (default: its own, 15 before, "
                                        "stage 3's after)")
    cli.add(p, "--seed", int, 0, unset=1, help="every variant's seed (default 1)")
    cli.add(p, "--train-limit", int, 1, help="default: all 60,000 images")
    cli.add(p, "--test-limit", int, 1, help="default: all 10,000 images")
    p.add_argument("--threads", type=threads_setting, default="auto",
                   help="torch threads for every variant: a count, or auto (default)")
    p.add_argument("--no-track", action="store_true", help="print only, log nothing to MLflow")
    return p


def main(argv=None) -> list[tuple[C.RunConfig, Outcome]]:
    try:
        args = parser().parse_args(argv)
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown or not names:
            raise C.ConfigError(f"--variants {args.variants!r}: unknown {unknown}; "
                                f"allowed: {', '.join(VARIANTS)}")
    except C.ConfigError as exc:
        cli.exit_bad_input(exc)
    # one thread count for every variant, decided once (auto: the cores free now), so they compare
    forced = {"seed": args.seed, "device": "cpu", "data.train_limit": args.train_limit,
              "data.test_limit": args.test_limit, "threads": T.resolve(args.threads)}
    if args.epochs is not None:
        forced["optim.epochs"] = args.epochs
    base = C.load(STAGE3)
    print(f"torch threads {forced['threads']}, seed {args.seed}, stop at a {base.target.hold}-epoch "
          f"hold of >= {base.target.accuracy} %")
    results = [measure(name, base, forced) for name in names]
    text = table(results, base.data.train_limit or 60000)
    print(text)
    if not args.no_track:
        log(results, text, args)
    return results


if __name__ == "__main__":
    main()
