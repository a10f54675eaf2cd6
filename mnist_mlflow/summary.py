"""A per-layer summary of a network: output shapes, parameters and receptive fields."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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
