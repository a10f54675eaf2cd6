"""Networks and the parameter budget (their CPU layers: `layers`; their summary: `summary`).

Every model takes raw MNIST pixels, float 0-255, shape (N, 1, 28, 28), and returns
(N, 10) logits: normalization is the first layer, so users never need the statistics.
Evaluating (not training), it takes at most MAX_BATCH images a call and refuses images
scaled to 0-1 (see `check_pixels`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .config import WIDTHS, ModelConfig
from .layers import DROPOUTS, ChannelsLastConv2d, ChannelsLastMaxPool2d, ToContiguous

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of pixels / 255, over the 60,000 training images
# Images a call when evaluating: bounds a served request's memory and time (100,000 images in
# one request took 8.6 GB and ran on after the server's timeout); callers with more split them.
MAX_BATCH = 4096


class BudgetError(ValueError):
    """A model has more parameters than its budget allows."""


class Normalize(nn.Module):
    """Raw 0-255 pixels -> standardized; the statistics travel with the weights as buffers."""

    def __init__(self, mean: float = MNIST_MEAN, std: float = MNIST_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # served or predicting: refuse what would come back as nonsense
            check_pixels(x)
        return (x / 255.0 - self.mean) / self.std


def check_pixels(x: torch.Tensor) -> None:
    """The model's contract: at most MAX_BATCH images of raw pixels 0-255.

    NaN fails both range comparisons, so it is caught too. An image whose brightest pixel is
    in (0, 1] was scaled to 0-1 (torchvision's ToTensor): as raw pixels it is near-black and
    every answer would be the same wrong class. An all-zero image is blank in either scale.
    """
    if len(x) > MAX_BATCH:  # before any work on the batch
        raise ValueError(f"a batch of {len(x):,} images is over the limit of {MAX_BATCH:,} a call "
                         "(the model's contract); send them in several requests")
    peak = x.flatten(1).amax(1)
    scaled = (peak > 0) & (peak <= 1)
    out_of_range, any_scaled = torch.stack([~((x >= 0) & (x <= 255)).all(), scaled.any()]).tolist()
    # one host sync per batch, in evaluation only
    if out_of_range:
        finite = x[torch.isfinite(x)]
        span = f"{finite.min().item():g} to {finite.max().item():g}" if finite.numel() else "none"
        raise ValueError(f"input pixels must be finite numbers in 0-255 (raw pixels, the model's "
                         f"contract); got {int((~torch.isfinite(x)).sum())} non-finite, finite "
                         f"values {span}")
    if any_scaled:
        scaled = scaled.nonzero().flatten()
        raise ValueError(f"input pixels must be raw 0-255, not scaled to 0-1: {len(scaled)} of "
                         f"{len(x)} images have no pixel above 1 (first: image {int(scaled[0])}); "
                         "multiply by 255")


def conv_bn(cin: int, cout: int, dropout: float, kernel: int = 3, mask: str = "bernoulli",
            channels_last: bool = False, pool: bool = False) -> nn.Sequential:
    """conv -> BN -> ReLU -> dropout; with `pool`, a 2x2 max-pooling right after the conv, so
    BN, ReLU and dropout see a quarter of the elements (channels-last: pooled before converting)."""
    if channels_last:
        layers = [ChannelsLastConv2d(cin, cout, kernel, bias=False, contiguous_output=not pool)]
    else:
        layers = [nn.Conv2d(cin, cout, kernel, bias=False)]
    if pool:  # same layers either way, so the state_dict keys match
        layers += [nn.MaxPool2d(2), ToContiguous()]
    return nn.Sequential(*layers, nn.BatchNorm2d(cout), nn.ReLU(), DROPOUTS[mask](dropout))


class TinyNet(nn.Module):
    """The constrained network of stages 2 and 3: 3x3 convs, BatchNorm, dropout, GAP head.

    28 -> 26 -> 24 (RF 5) -> maxpool 12 -> 1x1 -> 10 -> 8 -> 6 (RF 18) -> GAP -> 1x1 -> 10;
    with `width6`, a fourth 3x3 convolution: 6 -> 4 (RF 22) before the GAP.
    `mask` and `channels_last` choose how dropout, convolutions and pooling run, not what they
    compute. `pool_before_bn` pools the second convolution's output before its BatchNorm, ReLU
    and dropout (same parameters and receptive fields, a quarter of their work).
    """

    def __init__(self, width1: int = 9, width2: int = 16, dropout: float = 0.05,
                 mean: float = MNIST_MEAN, std: float = MNIST_STD, mask: str = "bernoulli",
                 channels_last: bool = False, pool_before_bn: bool = False,
                 width_transition: int | None = None, width3: int | None = None,
                 width4: int | None = None, width5: int | None = None,
                 width6: int | None = None):
        super().__init__()
        w1, w2 = width1, width2
        wt, w3, w4, w5 = width_transition or w1, width3 or w2, width4 or w2, width5 or w2
        block = functools.partial(conv_bn, dropout=dropout, mask=mask, channels_last=channels_last)
        # built in forward order, the order in which the seed's initial weights are drawn
        layers = [Normalize(mean, std), block(1, w1)]
        if pool_before_bn:  # the block holds the max-pooling
            layers.append(block(w1, w2, pool=True))
        else:
            layers += [block(w1, w2), (ChannelsLastMaxPool2d if channels_last else nn.MaxPool2d)(2)]
        layers += [block(w2, wt, kernel=1), block(wt, w3), block(w3, w4), block(w4, w5)]
        if width6:
            layers.append(block(w5, width6))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width6 or w5, 10, 1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BareboneNet(nn.Module):
    """Stage 1's unconstrained skeleton: wide convolutions, two poolings, no BatchNorm."""

    def __init__(self, mean: float = MNIST_MEAN, std: float = MNIST_STD):
        super().__init__()
        self.features = nn.Sequential(
            Normalize(mean, std),
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def count_params(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm's affine weights count; its running stats do not)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(cfg: ModelConfig, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> nn.Module:
    """Builds the configured network and enforces the budget before anything trains."""
    if cfg.arch == "tiny":
        model = TinyNet(cfg.width1, cfg.width2, cfg.dropout, mean, std, mask=cfg.dropout_mask,
                        channels_last=cfg.channels_last_conv, pool_before_bn=cfg.pool_before_bn,
                        width_transition=cfg.width_transition, width3=cfg.width3, width4=cfg.width4,
                        width5=cfg.width5, width6=cfg.width6)
    elif cfg.arch == "barebone":
        model = BareboneNet(mean, std)
    else:
        raise ValueError(f"model.arch={cfg.arch!r} is not allowed: tiny or barebone")
    n = count_params(model)
    if cfg.max_params is not None and n > cfg.max_params:
        raise BudgetError(f"model has {n:,} parameters, over the budget of {cfg.max_params:,} "
                          f"(arch={cfg.arch}, {widths_text(cfg)})")
    return model


def widths_text(cfg: ModelConfig) -> str:
    """The set widths, as config paths: ``width1=9, width2=16, width3=12``."""
    return ", ".join(f"{n}={getattr(cfg, n)}" for n in WIDTHS if getattr(cfg, n) is not None)


def param_count_of(cfg: ModelConfig) -> int:
    """The parameter count a config would give, without the budget check (for search)."""
    unbounded = ModelConfig(**{**cfg.__dict__, "max_params": None})
    return count_params(build_model(unbounded))
