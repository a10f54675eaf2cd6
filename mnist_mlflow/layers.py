"""CPU layers the networks are built from: dropout masks and memory-layout conversions.

Each computes what its stock counterpart computes (nn.Dropout, nn.Conv2d, nn.MaxPool2d), the same
parameters and state_dict, and changes only how the CPU does the work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MaskDropout(nn.Module):
    """Per-element dropout, as nn.Dropout, with a cheaper mask on the CPU: `mask(x)`, drawn
    from the default torch generator (seeds and checkpoints work as for nn.Dropout), in x's
    memory layout (NCHW or channels-last, so the product stays dense), scale included, in x's
    dtype (bf16 stays bf16). Other devices use ``F.dropout``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.scale = 1.0 / (1.0 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return x * self.mask(x)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SparseMaskDropout(MaskDropout):
    """Draws only the positions it drops. The gaps between dropped elements of an i.i.d.
    Bernoulli(p) mask are geometric; each is ceil(log(U) / log(1 - p)) of a uniform U. For
    p = 0.05 that is one uniform per 20 elements (`bernoulli_` draws one number per element), then
    a filled mask with those positions zeroed. Exact p.
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


# per element: two ways to draw the same distribution
DROPOUTS = {"bernoulli": nn.Dropout, "sparse": SparseMaskDropout}


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

    oneDNN's CPU convolutions, forward and backward, are fastest channels-last (their kernels
    vectorize along the channels), while the CPU's BatchNorm over a few channels is fastest NCHW
    (it reduces each channel's plane); converting around each convolution (gradients too) keeps
    the best of both (`benchmarks/step_time.py` measures it). Same parameters and state_dict as
    nn.Conv2d. With ``contiguous_output=False`` the output stays
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
    """A MaxPool2d that pools channels-last (the CPU kernel vectorizes along the channels there,
    forward and backward; NCHW strides through small windows) and hands back a contiguous tensor.
    Same values and gradients."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(_Relayout.apply(x, torch.channels_last))
        return _Relayout.apply(y, torch.contiguous_format)
