"""Stage 1's data study: pixel statistics, stroke thickness, and the receptive-field study."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of pixels / 255 (MNIST: about 0.1307 and 0.3081)."""
    x = images.astype(np.float64) / 255.0
    return float(x.mean()), float(x.std())


def ink(images: np.ndarray) -> np.ndarray:
    """Pixels above half intensity per image: a proxy for stroke thickness."""
    return (images > 127).reshape(len(images), -1).sum(1)


def thickness_examples(images: np.ndarray, labels: np.ndarray, digit: int = 1, k: int = 6) -> np.ndarray:
    """`k` images of one digit spread from thinnest to thickest stroke."""
    idx = np.flatnonzero(labels == digit)
    order = idx[np.argsort(ink(images[idx]))]
    return order[np.linspace(0, len(order) - 1, k).round().astype(int)]


def _ramp_lengths(lines: np.ndarray, low: int, high: int) -> list[int]:
    """Pixel distance from a background pixel (<= low) up a rising run to a stroke pixel (>= high)."""
    out = []
    for line in lines:
        for seq in (line, line[::-1]):  # rising edges in both directions
            n, i = len(seq), 0
            while i < n - 1:
                if seq[i + 1] > seq[i] and seq[i] <= low:
                    j = i
                    while j < n - 1 and seq[j + 1] >= seq[j] and seq[j] < high:
                        j += 1
                    if seq[j] >= high:
                        out.append(j - i)
                    i = j + 1
                else:
                    i += 1
    return out


@dataclass(frozen=True)
class RFStudy:
    rows: np.ndarray  # ramp lengths along rows, in pixels
    cols: np.ndarray  # ... along columns
    chosen_rf: int  # smallest odd window spanning 95% of the ramps
    sample_size: int


def receptive_field_study(images: np.ndarray, n: int = 1000, seed: int = 0,
                          low: int = 25, high: int = 230) -> RFStudy:
    """Over `n` random images: distance between lowest- and highest-intensity pixels across edges."""
    rng = np.random.default_rng(seed)
    sample = images[rng.choice(len(images), size=min(n, len(images)), replace=False)].astype(np.int16)
    rows = np.array(_ramp_lengths(sample.reshape(-1, sample.shape[-1]), low, high))
    cols = np.array(_ramp_lengths(sample.transpose(0, 2, 1).reshape(-1, sample.shape[-2]), low, high))
    p95 = int(np.ceil(np.percentile(np.concatenate([rows, cols]), 95)))
    rf = p95 + 1  # a window of d + 1 pixels spans a ramp of length d
    return RFStudy(rows, cols, rf if rf % 2 else rf + 1, len(sample))
