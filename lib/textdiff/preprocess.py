"""The one place where pixels become backbone input: intensity range, channels, working scale.

Training, CLI inference and the MONAI Label app all go through these functions, with parameters from the model
folder's config, so the three can never disagree.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def intensity_range(array: np.ndarray) -> tuple[float, float]:
    """8-bit data keeps its full range; anything else (CT, MR, 16-bit) uses robust percentiles of the whole input."""
    if array.dtype == np.uint8:
        return 0.0, 255.0
    low, high = np.percentile(array, (0.5, 99.5))
    return float(low), float(high) if high > low else float(low) + 1.0


def to_tensor(plane: np.ndarray, in_channels: int, value_range: tuple[float, float]) -> torch.Tensor:
    """(H, W) or (H, W, C) pixels -> (in_channels, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(plane)).float()
    if x.ndim == 2:
        x = x[..., None]
    x = x.permute(2, 0, 1)
    low, high = value_range
    x = ((x - low) / (high - low)).clamp(0, 1) * 2 - 1
    if x.shape[0] == in_channels:
        return x
    if x.shape[0] == 1:  # grey into an RGB backbone
        return x.expand(in_channels, -1, -1).clone()
    if in_channels == 1:  # colour into a grey backbone: luminance
        weights = torch.tensor([0.299, 0.587, 0.114])[: x.shape[0]]
        return (x * (weights / weights.sum())[:, None, None]).sum(0, keepdim=True)
    raise ValueError(f"cannot feed a {x.shape[0]}-channel image to a {in_channels}-channel backbone")


def rescale(x: torch.Tensor, scale: float, mode: str = "bilinear") -> torch.Tensor:
    """Resize (C, H, W) by a factor (the model's working scale); masks use mode='nearest-exact'."""
    if scale == 1.0:
        return x
    size = [max(1, round(s * scale)) for s in x.shape[-2:]]
    if mode == "nearest-exact":
        return F.interpolate(x[None].float(), size=size, mode=mode)[0].to(x.dtype)
    return F.interpolate(x[None], size=size, mode=mode, align_corners=False, antialias=scale < 1)[0]


def resize_to(x: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) probabilities/logits back to the input's exact (H, W)."""
    if tuple(x.shape[-2:]) == tuple(size_hw):
        return x
    return F.interpolate(x[None], size=tuple(size_hw), mode="bilinear", align_corners=False)[0]


def label_map(probs: torch.Tensor) -> torch.Tensor:
    """Class index per pixel of (C, ...) probabilities. Reducing a short leading axis is slow in PyTorch (160 ms at
    2 x 1000 x 1000 on a CPU, a third of a click round); the same argmax over a contiguous last axis takes 12 ms."""
    return probs.movedim(0, -1).contiguous().argmax(-1)


def prepare(plane: np.ndarray, in_channels: int, scale: float, value_range=None) -> torch.Tensor:
    """Pixels of one 2D plane -> model input at the working scale."""
    value_range = value_range or intensity_range(plane)
    return rescale(to_tensor(plane, in_channels, value_range), scale)


def prepare_mask(mask: np.ndarray, scale: float) -> torch.Tensor:
    """(H, W) class indices -> (1, h, w) at the working scale."""
    return rescale(torch.from_numpy(np.ascontiguousarray(mask)).long()[None], scale, mode="nearest-exact")


def grid_starts(length: int, window: int) -> list[int]:
    """Window starts covering [0, length) with as little overlap as possible."""
    if length <= window:
        return [0]
    n = math.ceil(length / window)
    return sorted({round(i * (length - window) / (n - 1)) for i in range(n)})


def tile_layout(size_hw: tuple[int, int], window: int, tile: int, multiple: int):
    """Padded size, tile sides and tile starts of a working image: padded to >= window and to the backbone's
    multiple, cut into tiles of at most ``tile`` (sides a multiple of ``multiple``) overlapping as little as
    possible."""
    def up(n: int) -> int:
        return -(-n // multiple) * multiple
    padded = tuple(up(max(n, window)) for n in size_hw)
    sides = tuple(min(p, up(max(tile, window))) for p in padded)
    starts = [(i, j) for i in grid_starts(padded[0], sides[0]) for j in grid_starts(padded[1], sides[1])]
    return padded, sides, starts
