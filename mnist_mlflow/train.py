"""The one training code path for every stage, the search and the benchmarks.

No tracking in here: `fit` calls ``on_epoch_end(metrics)`` once per epoch and the
caller decides what that means (MLflow logging, Optuna pruning, nothing).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from .augment import augment_batch
from .config import RunConfig
from .data import Splits
from .evaluation import evaluate
from .explore import pixel_stats
from .models import build_model
from .threads import apply as apply_threads, resolve as resolve_threads


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # from 1
    train_loss: float
    train_accuracy: float  # percent, on augmented images with dropout active
    test_loss: float
    test_accuracy: float  # percent
    lr: float  # at the start of the epoch
    epoch_seconds: float  # training and evaluation
    val_loss: Optional[float] = None
    val_accuracy: Optional[float] = None

    def as_metrics(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if k != "epoch" and v is not None}


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochMetrics] = field(default_factory=list)
    device: str = "cpu"
    threads: int = 1  # torch CPU threads it trained with


class Diverged(RuntimeError):
    """The training loss became NaN or infinite: nothing after that epoch is worth keeping."""


EpochCallback = Callable[[EpochMetrics], Optional[bool]]  # True: stop after this epoch
CheckpointCallback = Callable[[dict], None]


class WeightAverage(AveragedModel):
    """An exponential moving average of the weights and BatchNorm statistics, updated per step.

    Bias-corrected as Adam's moments are: step t weighs (1 - decay) / (1 - decay**t), so the
    random initial weights do not linger in the average (a plain EMA keeps decay**t of them).
    Same state_dict and values as `AveragedModel`'s update, which collects and groups the
    tensors on every call; this one does so once and counts steps on the host (no device sync).
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, use_buffers=True)
        self.decay = decay
        self._pairs: tuple | None = None  # (model, averaged floats, its floats, averaged ints, its ints)
        self._steps: int | None = None  # mirrors n_averaged
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_steps", None))

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._pairs is None or self._pairs[0] is not model:
            mine = [*self.module.parameters(), *self.module.buffers()]
            theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
            floats = [i for i, t in enumerate(mine) if t.is_floating_point()]
            ints = [i for i, t in enumerate(mine) if not t.is_floating_point()]  # num_batches_tracked
            self._pairs = (model, [mine[i].detach() for i in floats], [theirs[i] for i in floats],
                           [mine[i].detach() for i in ints], [theirs[i] for i in ints])
        if self._steps is None:
            self._steps = int(self.n_averaged)
        _, avg_f, cur_f, avg_i, cur_i = self._pairs
        if self._steps == 0:
            torch._foreach_copy_(avg_f, cur_f)
        else:
            weight = (1 - self.decay) / (1 - self.decay ** (self._steps + 1))
            torch._foreach_lerp_(avg_f, cur_f, weight)
        if avg_i:
            torch._foreach_copy_(avg_i, cur_i)
        self._steps += 1
        self.n_averaged += 1


def make_ema(model: nn.Module, decay: float | None) -> WeightAverage | None:
    return WeightAverage(model, decay) if decay is not None else None


def make_checkpoint(epoch: int, model: nn.Module, opt, sched, gen: torch.Generator,
                    history: list[EpochMetrics], ema: WeightAverage | None = None) -> dict:
    """Everything needed to continue bit for bit: tensors and plain containers only,
    so it loads with ``torch.load(weights_only=True)``."""
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict() if sched is not None else None,
             "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
             "history": [asdict(h) for h in history],
             "ema": ema.state_dict() if ema is not None else None}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_checkpoint(state: dict, model: nn.Module, opt, sched, gen: torch.Generator,
                       ema: WeightAverage | None = None) -> list[EpochMetrics]:
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])  # data order and augmentation
    torch.set_rng_state(state["torch_rng"])  # dropout masks
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return [EpochMetrics(**h) for h in state["history"]]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for, but CUDA is not available here")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_model(cfg: RunConfig, train_x: np.ndarray) -> tuple[nn.Module, float, float]:
    """A run's model before training: normalized with the statistics of its training images,
    initial weights from `cfg.seed`. Returns (model, pixel mean, pixel std)."""
    mean, std = pixel_stats(train_x)
    seed_everything(cfg.seed)
    return build_model(cfg.model, mean, std), mean, std


def as_tensors(x: np.ndarray, y: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images stay uint8 on the device (4x less memory); batches are cast when used."""
    return torch.from_numpy(x).to(device).unsqueeze(1), torch.from_numpy(y).to(device)


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: RunConfig, steps_per_epoch: int):
    """Returns (scheduler or None, whether it steps per batch)."""
    s, epochs = cfg.schedule, cfg.optim.epochs
    if s.name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=s.max_lr, epochs=epochs, steps_per_epoch=steps_per_epoch,
            pct_start=s.pct_start, anneal_strategy=s.anneal, div_factor=s.div_factor,
            final_div_factor=s.final_div_factor), True
    if s.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=epochs * steps_per_epoch, eta_min=s.min_lr), True
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_size, gamma=s.gamma), False
    return None, False


def train_step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, opt: torch.optim.Optimizer,
               batch_sched, autocast, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step; `batch_sched` (or None) steps per batch. Returns (logits, loss), the
    loss against the smoothed targets."""
    with autocast:
        logits = model(xb).float()
    loss = F.cross_entropy(logits, yb, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if batch_sched is not None:
        batch_sched.step()
    return logits, loss


def make_autocast(cfg: RunConfig, device: torch.device) -> torch.autocast:
    """bf16 forward passes (weights, gradients and optimizer state stay fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def fit(cfg: RunConfig, splits: Splits, on_epoch_end: EpochCallback | None = None,
        progress: bool = True, model: nn.Module | None = None,
        on_checkpoint: CheckpointCallback | None = None, resume_from: dict | None = None,
        stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    """Trains `cfg`'s model on `splits.train`, evaluating on test (and val) after each epoch.

    Without `model`, it is built as `init_model` builds a run's (the same model for the same seed).

    `on_checkpoint` gets the state after every epoch, after `on_epoch_end`; `resume_from`
    (such a state) continues from the epoch after it, to the same result as an uninterrupted run.
    An `on_epoch_end` that returns True ends training after that epoch (the schedule is unchanged).
    A `stop_requested` that returns True (checked before every batch) raises KeyboardInterrupt:
    interrupts land between batches, never inside the callbacks.
    `cfg.threads` "auto" is resolved here; a caller that must record or reuse the number
    (a tracked run, a resume) resolves it first and passes the int.
    """
    n_threads = resolve_threads(cfg.threads)
    apply_threads(n_threads)
    device = resolve_device(cfg.device)
    if model is None:  # as a tracked run builds it, before the seeding below
        model, _, _ = init_model(cfg, splits.train_x)
    seed_everything(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    train_x, train_y = as_tensors(splits.train_x, splits.train_y, device)
    test_x, test_y = as_tensors(splits.test_x, splits.test_y, device)
    val = as_tensors(splits.val_x, splits.val_y, device) if splits.val_y is not None else None

    model = model.to(device)
    n, bs = len(train_y), cfg.optim.batch_size
    steps = (n + bs - 1) // bs
    opt = make_optimizer(model, cfg)
    sched, per_batch = make_scheduler(opt, cfg, steps)
    ema = make_ema(model, cfg.optim.ema_decay)
    evaluated = ema.module if ema is not None else model  # what is evaluated and returned
    result = TrainResult(model=evaluated, device=str(device), threads=n_threads)
    first = 1
    if resume_from is not None:
        result.history = restore_checkpoint(resume_from, model, opt, sched, gen, ema)
        first = resume_from["epoch"] + 1

    autocast = make_autocast(cfg, device)  # evaluation stays fp32
    bar = tqdm(range(first, cfg.optim.epochs + 1), desc=cfg.stage, unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        order = torch.randperm(n, generator=gen, device=device)
        for i in range(steps):
            if stop_requested is not None and stop_requested():
                raise KeyboardInterrupt("stop requested")
            idx = order[i * bs:(i + 1) * bs]
            xb = augment_batch(train_x[idx].float(), cfg.augment, gen)
            yb = train_y[idx]
            logits, loss = train_step(model, xb, yb, opt, sched if per_batch else None, autocast,
                                      cfg.optim.label_smoothing)
            if ema is not None:
                ema.update_parameters(model)
            # accumulate on the device; one sync per epoch below
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
        if sched is not None and not per_batch:
            sched.step()
        test_loss, test_acc = evaluate(evaluated, test_x, test_y)
        val_loss, val_acc = evaluate(evaluated, *val) if val is not None else (None, None)
        metrics = EpochMetrics(
            epoch=epoch, train_loss=loss_sum.item() / n, train_accuracy=correct.item() * 100.0 / n,
            test_loss=test_loss, test_accuracy=test_acc, lr=lr,
            epoch_seconds=time.perf_counter() - t0, val_loss=val_loss, val_accuracy=val_acc)
        if not math.isfinite(metrics.train_loss):  # already synced above: no extra cost
            raise Diverged(f"training diverged in epoch {epoch}: train_loss={metrics.train_loss} "
                           f"(lr {lr:g}); lower the learning rate (optim.lr, schedule.max_lr)")
        result.history.append(metrics)
        bar.set_postfix(train=f"{metrics.train_accuracy:.2f}", test=f"{test_acc:.2f}")
        stop = on_epoch_end is not None and on_epoch_end(metrics)
        if on_checkpoint is not None:  # after on_epoch_end: a tracked run logs the metrics after it
            on_checkpoint(make_checkpoint(epoch, model, opt, sched, gen, result.history, ema))
        if stop:
            break
    return result
