"""Whole-batch augmentation on tensors: random rotation, shift and stroke thickness.

Batches stay on the training device; one affine grid rotates and shifts the whole batch and
3x3 max-pooling stands in for morphological dilation (erosion is its dual). The
OpenCV functions at the bottom are the reference operations, used for figures.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .config import AugmentConfig


def rotate(images: torch.Tensor, degrees: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
    """Rotates each (1, H, W) image counter-clockwise by its angle, about the centre, zero fill;
    then moves it by `shift` (N, 2) pixels (x right, y down), when given.

    Same convention as ``torchvision.transforms.v2.functional.rotate``.
    """
    rad = degrees.to(images.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    zero = torch.zeros_like(cos)
    tx, ty = (zero, zero) if shift is None else (
        -2 * shift[:, 0].to(images.dtype) / images.shape[-1], -2 * shift[:, 1].to(images.dtype) / images.shape[-2])
    # affine_grid maps output coordinates to input ones, so this is the inverse transform.
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def dilate(images: torch.Tensor) -> torch.Tensor:
    """3x3 grey-level dilation: thicker strokes."""
    return F.max_pool2d(images, 3, stride=1, padding=1)


def erode(images: torch.Tensor) -> torch.Tensor:
    """3x3 grey-level erosion: thinner strokes."""
    return -F.max_pool2d(-images, 3, stride=1, padding=1)


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random thickness change, then random rotation in [-d, +d] and shift. Labels are untouched.

    `images` are raw float pixels (N, 1, 28, 28); with all strengths 0 they come back as they are.
    """
    n = images.shape[0]
    if cfg.thickness_prob > 0:
        u = torch.rand(n, 1, 1, 1, generator=generator, device=images.device)
        thick = u < cfg.thickness_prob / 2
        thin = (u >= cfg.thickness_prob / 2) & (u < cfg.thickness_prob)
        images = torch.where(thick, dilate(images), torch.where(thin, erode(images), images))
    if cfg.rotation_degrees > 0 or cfg.translate_px > 0:
        # draws only for what is on, so a config without a shift keeps its random stream
        degrees = torch.zeros(n, device=images.device)
        if cfg.rotation_degrees > 0:
            degrees = (2 * torch.rand(n, generator=generator, device=images.device) - 1) * cfg.rotation_degrees
        shift = None
        if cfg.translate_px > 0:
            shift = (2 * torch.rand(n, 2, generator=generator, device=images.device) - 1) * cfg.translate_px
        images = rotate(images, degrees, shift)
    return images


# ---------------------------------------------------------------- OpenCV reference (figures)

_KERNEL = np.ones((3, 3), np.uint8)


def cv_dilate(image: np.ndarray) -> np.ndarray:
    return cv2.dilate(image, _KERNEL, iterations=1)


def cv_erode(image: np.ndarray) -> np.ndarray:
    return cv2.erode(image, _KERNEL, iterations=1)
