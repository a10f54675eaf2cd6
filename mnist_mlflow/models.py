"""Networks, the parameter budget, and a per-layer summary with receptive fields.

Every model takes raw MNIST pixels, float 0-255, shape (N, 1, 28, 28), and returns
(N, 10) logits: normalization is the first layer, so users never need the statistics.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of pixels / 255, over the 60,000 training images


class BudgetError(ValueError):
    """A model has more parameters than its budget allows."""


class Normalize(nn.Module):
    """Raw 0-255 pixels -> standardized; the statistics travel with the weights as buffers."""

    def __init__(self, mean: float = MNIST_MEAN, std: float = MNIST_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:  # served or predicting: refuse what would come back as NaN logits
            check_pixels(x)
        return (x / 255.0 - self.mean) / self.std


def check_pixels(x: torch.Tensor) -> None:
    """The model's contract: raw pixels 0-255. NaN fails both comparisons, so it is caught too."""
    if not ((x >= 0) & (x <= 255)).all():  # one host sync per batch, in evaluation only
        finite = x[torch.isfinite(x)]
        span = f"{finite.min().item():g} to {finite.max().item():g}" if finite.numel() else "none"
        raise ValueError(f"input pixels must be finite numbers in 0-255 (raw pixels, the model's "
                         f"contract); got {int((~torch.isfinite(x)).sum())} non-finite, finite "
                         f"values {span}")


class MaskDropout(nn.Module):
    """Per-element dropout, as nn.Dropout, with a cheaper mask on the CPU: `mask(x)`, drawn
    from the default torch generator (seeds and checkpoints work as for nn.Dropout), in x's
    memory layout (NCHW or channels-last, so the product stays dense), scale included, in x's
    dtype (bf16 stays bf16). Other devices use ``F.dropout``."""

    def __init__(self, p: float, effective_p: float | None = None):
        super().__init__()
        self.p = p
        self.effective_p = p if effective_p is None else effective_p
        self.scale = 1.0 / (1.0 - self.effective_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.effective_p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * self.mask(x)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"p={self.p}" + (f", effective_p={self.effective_p:.6f}" if self.effective_p != self.p else "")


class WordMaskDropout(MaskDropout):
    """Each 64-bit random word gives four mask entries (the low 15 bits of each 16-bit slice,
    all uniform), so the generator is called a quarter as often as by ``bernoulli_``, which
    costs a third of a CPU training step here. p is rounded to a multiple of 2**-15
    (0.05 -> 0.049988)."""

    def __init__(self, p: float):
        self.threshold = round(p * 2**15)  # drop where the 15-bit value is below this
        super().__init__(p, self.threshold / 2**15)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
        bits = words.view(torch.int16)[:n].as_strided(x.shape, x.stride()) & 0x7FFF
        return torch.where(bits >= self.threshold, x.new_full((), self.scale), x.new_zeros(()))


class SparseMaskDropout(MaskDropout):
    """Draws only the positions it drops. The gaps between dropped elements of an i.i.d.
    Bernoulli(p) mask are geometric; each is ceil(log(U) / log(1 - p)) of a uniform U. For
    p = 0.05 that is one uniform per 20 elements (`WordMaskDropout` draws one 64-bit word per 4,
    `bernoulli_` one number per element), then a filled mask with those positions zeroed. Exact p.
    """

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        mask = torch.full_like(x, self.scale)  # dense, in x's memory layout
        mask.as_strided((n,), (1,))[self.dropped_positions(n)] = 0
        return mask

    def dropped_positions(self, n: int, draws: int | None = None) -> torch.Tensor:
        """Sorted flat indices in [0, n), each included independently with probability p.
        Gaps are drawn `draws` at a time (default: enough to cover n in all but ~1e-9 of calls)."""
        if draws is None:
            expected = n * self.p
            draws = int(expected + 6 * math.sqrt(expected) + 16)
        chunks, start = [torch.empty(0, dtype=torch.int64)], 0
        while start < n:
            uniform = 1.0 - torch.rand(draws)  # (0, 1]
            gaps = uniform.log_().div_(math.log1p(-self.p)).ceil_().clamp_min_(1)
            positions = gaps.to(torch.int64).cumsum_(0).add_(start - 1)
            chunks.append(positions)
            start = int(positions[-1]) + 1
        positions = torch.cat(chunks) if len(chunks) > 2 else chunks[-1]
        return positions[:int(torch.searchsorted(positions, n))]


# per element (three ways to draw the same distribution), or whole feature maps per image
DROPOUTS = {"bernoulli": nn.Dropout, "words16": WordMaskDropout, "sparse": SparseMaskDropout,
            "channel": nn.Dropout2d}


class _Relayout(torch.autograd.Function):
    """x in memory format `fmt` going forward, its gradient back in x's own format."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        ctx.back = torch.contiguous_format if x.is_contiguous() else torch.channels_last
        return x.contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.contiguous(memory_format=ctx.back), None


class ChannelsLastConv2d(nn.Conv2d):
    """A Conv2d that runs channels-last and hands back a contiguous (NCHW) tensor.

    oneDNN's convolution, forward and backward, is 2-3x faster channels-last for these few
    channels, while BatchNorm over 9-17 channels is several times slower channels-last on the
    CPU; converting around each convolution (gradients too) keeps the best of both. Same
    parameters and state_dict as nn.Conv2d. With ``contiguous_output=False`` the output stays
    channels-last (for a pooling before the conversion: `ToContiguous`).
    """

    def __init__(self, *args, contiguous_output: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.contiguous_output = contiguous_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(_Relayout.apply(x, torch.channels_last))
        return _Relayout.apply(y, torch.contiguous_format) if self.contiguous_output else y


class ToContiguous(nn.Module):
    """Channels-last in, NCHW out, its gradient back channels-last; a no-op on NCHW."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Relayout.apply(x, torch.contiguous_format)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """A MaxPool2d that pools channels-last (about 10x faster here than NCHW on the CPU, forward
    and backward) and hands back a contiguous tensor. Same values and gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(_Relayout.apply(x, torch.channels_last))
        return _Relayout.apply(y, torch.contiguous_format)


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

    28 -> 26 -> 24 (RF 5) -> maxpool 12 -> 1x1 -> 10 -> 8 -> 6 (RF 18) -> GAP -> 1x1 -> 10.
    `mask` and `channels_last` choose how dropout, convolutions and pooling run, not what they
    compute. `pool_before_bn` pools the second convolution's output before its BatchNorm, ReLU
    and dropout (same parameters and receptive fields, a quarter of their work).
    """

    def __init__(self, width1: int = 9, width2: int = 16, dropout: float = 0.05,
                 mean: float = MNIST_MEAN, std: float = MNIST_STD, mask: str = "bernoulli",
                 channels_last: bool = False, pool_before_bn: bool = False,
                 width_transition: int | None = None, width3: int | None = None,
                 width4: int | None = None, width5: int | None = None):
        super().__init__()
        w1, w2 = width1, width2
        widths = (w1, w2, width_transition or w1, width3 or w2, width4 or w2, width5 or w2)
        block = functools.partial(conv_bn, dropout=dropout, mask=mask, channels_last=channels_last)

        def pooled(cin: int, cout: int) -> list[nn.Module]:
            if pool_before_bn:
                return [block(cin, cout, pool=True)]
            return [block(cin, cout), (ChannelsLastMaxPool2d if channels_last else nn.MaxPool2d)(2)]

        self.features = nn.Sequential(Normalize(mean, std), *self.blocks(block, pooled, widths))
        last = [m for m in self.features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(last, 10, 1), nn.Flatten())

    @staticmethod
    def blocks(block, pooled, widths: tuple[int, ...]) -> list[nn.Module]:
        """`pooled(cin, cout)`: the convolution block followed by (or holding) the max-pooling.
        `widths`: conv1, conv2 (pooled), the 1x1 transition, conv3, conv4, conv5."""
        w1, w2, wt, w3, w4, w5 = widths
        return [block(1, w1), *pooled(w1, w2), block(w2, wt, kernel=1),
                block(wt, w3), block(w3, w4), block(w4, w5)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class LeanNet(TinyNet):
    """TinyNet's receptive fields with a thin full-resolution block and no 1x1 transition:
    about a quarter fewer multiply-adds and activations, where a CPU step spends its time.

    28 -> 26 -> 24 (RF 5, width1 channels) -> maxpool 12 -> 10 -> 8 -> 6 (RF 18) -> GAP -> 1x1.
    """

    @staticmethod
    def blocks(block, pooled, widths: tuple[int, ...]) -> list[nn.Module]:
        w1, w2 = widths[:2]
        return [block(1, w1), *pooled(w1, w1), block(w1, w2), block(w2, w2),
                block(w2, w2)]


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
    if cfg.arch in ("tiny", "lean"):
        cls = TinyNet if cfg.arch == "tiny" else LeanNet
        per_block = {} if cfg.arch == "lean" else {
            "width_transition": cfg.width_transition, "width3": cfg.width3, "width4": cfg.width4,
            "width5": cfg.width5}
        model = cls(cfg.width1, cfg.width2, cfg.dropout, mean, std, mask=cfg.dropout_mask,
                    channels_last=cfg.channels_last_conv, pool_before_bn=cfg.pool_before_bn,
                    **per_block)
    elif cfg.arch == "barebone":
        model = BareboneNet(mean, std)
    else:
        raise ValueError(f"model.arch={cfg.arch!r} is not allowed: tiny, lean or barebone")
    n = count_params(model)
    if cfg.max_params is not None and n > cfg.max_params:
        raise BudgetError(f"model has {n:,} parameters, over the budget of {cfg.max_params:,} "
                          f"(arch={cfg.arch}, {widths_text(cfg)})")
    return model


def widths_text(cfg: ModelConfig) -> str:
    """The set widths, as config paths: ``width1=9, width2=16, width3=12``."""
    names = ("width1", "width2", "width_transition", "width3", "width4", "width5")
    return ", ".join(f"{n}={getattr(cfg, n)}" for n in names if getattr(cfg, n) is not None)


def param_count_of(cfg: ModelConfig) -> int:
    """The parameter count a config would give, without the budget check (for search)."""
    unbounded = ModelConfig(**{**cfg.__dict__, "max_params": None})
    return count_params(build_model(unbounded))


# ---------------------------------------------------------------- summary

@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    receptive_field: int


def layer_summary(model: nn.Module, input_shape=(1, 1, 28, 28)) -> list[LayerRow]:
    """Leaf layers in forward order with output shape, parameters and receptive field.

    RF follows the usual recurrence: rf += (k - 1) * jump; jump *= stride.
    """
    rows: list[LayerRow] = []
    state = {"rf": 1, "jump": 1}

    def hook(module: nn.Module, _inp, out) -> None:
        k = s = 1
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
            s = module.stride if isinstance(module.stride, int) else module.stride[0]
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            k = _inp[0].shape[-1]  # global pooling sees the whole remaining map
            s = k
        state["rf"] += (k - 1) * state["jump"]
        state["jump"] *= s
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append(LayerRow(names[module], type(module).__name__, tuple(out.shape[1:]), params,
                             state["rf"]))

    names = {m: n for n, m in model.named_modules() if not list(m.children())}
    handles = [m.register_forward_hook(hook) for m in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return rows


def format_summary(rows: list[LayerRow]) -> str:
    lines = [f"{'layer':<22}{'type':<20}{'output shape':<18}{'params':>8}{'RF':>6}"]
    for r in rows:
        shape = "x".join(map(str, r.output_shape))
        lines.append(f"{r.name:<22}{r.kind:<20}{shape:<18}{r.params:>8,}{r.receptive_field:>6}")
    lines.append(f"total parameters: {sum(r.params for r in rows):,}")
    return "\n".join(lines)
