"""Seconds per training epoch: the project's pipeline against a torchvision DataLoader baseline.

Both train the same stage-3 model (same optimizer, schedule and batch size) on real MNIST,
side by side in one process; the baseline rotates each image on its own with
``torchvision.transforms.v2.RandomRotation`` inside a per-sample Dataset/DataLoader, the
project rotates whole batches of in-memory tensors. Prints a table and the ratio, and logs
both to MLflow when ``--track`` is given.

    python -m benchmarks.epoch_speed --epochs 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from mnist_mlflow import config as C
from mnist_mlflow.data import load_mnist, make_splits
from mnist_mlflow.models import build_model, count_params
from mnist_mlflow.train import fit, make_optimizer, make_scheduler, seed_everything

ROOT_CONFIG = Path(__file__).resolve().parent.parent / "experiments/stage3.yaml"


class PerSampleMnist(Dataset):
    """The classic notebook pipeline: one image at a time through torchvision transforms."""

    def __init__(self, images, labels, degrees: float):
        self.images, self.labels = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)
        self.transform = v2.Compose([v2.RandomRotation(degrees), v2.ToDtype(torch.float32)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


def baseline_epochs(cfg: C.RunConfig, splits, workers: int) -> list[float]:
    """Seconds per epoch of the DataLoader pipeline (training only, as the project's figure)."""
    seed_everything(cfg.seed)
    model = build_model(cfg.model)
    loader = DataLoader(PerSampleMnist(splits.train_x, splits.train_y, cfg.augment.rotation_degrees),
                        batch_size=cfg.optim.batch_size, shuffle=True, num_workers=workers)
    opt = make_optimizer(model, cfg)
    sched, per_batch = make_scheduler(opt, cfg, len(loader))
    seconds = []
    for _ in range(cfg.optim.epochs):
        t0 = time.perf_counter()
        model.train()
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if per_batch:
                sched.step()
        seconds.append(time.perf_counter() - t0)
    return seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-limit", type=int, default=None, help="default: all 60,000 images")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for the baseline")
    p.add_argument("--track", action="store_true", help="log the figures to MLflow")
    args = p.parse_args(argv)

    cfg = C.load(ROOT_CONFIG, {"optim.epochs": args.epochs, "data.train_limit": args.train_limit})
    splits = make_splits(load_mnist(), train_limit=args.train_limit)
    n = len(splits.train_y)
    ours = fit(cfg, splits, progress=False).history
    # the project's figure includes its per-epoch test evaluation; subtract nothing, report both
    project = [h.epoch_seconds for h in ours]
    base = baseline_epochs(cfg, splits, args.workers)
    p_s, b_s = sum(project) / len(project), sum(base) / len(base)
    rows = [("project: in-memory tensors, batched rotation (+ test eval)", p_s),
            (f"baseline: DataLoader, per-sample v2.RandomRotation, {args.workers} workers", b_s)]
    print(f"{n:,} training images, {count_params(build_model(cfg.model)):,} parameters, "
          f"{args.epochs} epoch(s) each, torch threads {torch.get_num_threads()}")
    for name, s in rows:
        print(f"  {name:<72} {s:7.1f} s/epoch")
    print(f"  speed-up (baseline / project): {b_s / p_s:.2f}x")
    if args.track:
        import mlflow

        with mlflow.start_run(run_name="benchmark-epoch-speed"):
            mlflow.log_params({"train_images": n, "epochs": args.epochs, "workers": args.workers})
            mlflow.log_metrics({"project_s_per_epoch": p_s, "baseline_s_per_epoch": b_s,
                                "speedup": b_s / p_s})


if __name__ == "__main__":
    main()
