"""The companion U-Net: a plain MONAI U-Net trained from scratch on the labeled images alone, beside the head on
frozen features; inference averages the two models' probabilities (a late ensemble).

Why: the head reads frozen diffusion features and leads with a few labels; a network trained end to end on the image
keeps improving with more labels, where the frozen features stop. Their errors differ, so the average beats both
(docs/results.md, "The companion U-Net", label count by label count). The same training serves as the
label-efficiency curves' U-Net baseline (``scripts/unet_baseline.py``, which also keeps its best of 10 checks).
"""
from __future__ import annotations

import random
from collections.abc import Callable

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from tqdm.auto import tqdm

from . import preprocess, priority
from .backbone import _autocast, resolve_precision
from .data import Sample, read_image, read_mask
from .head import rotate_flip
from .preprocess import grid_starts

WIDTHS = (16, 32, 64, 128, 256)  # the curves' U-Net baseline's (MONAI's usual 2D U-Net)
LR = 1e-3
LAMBDA_DICE = 1.5
OVERLAP = 0.25  # of inference windows (Gaussian-blended)


def build(widths: list[int], in_channels: int, num_classes: int) -> UNet:
    """A 2D MONAI U-Net with ``widths`` channels per level (stride 2 between levels, two residual units each)."""
    if len(widths) < 2 or any(w < 1 for w in widths):
        raise ValueError(f"companion widths must be at least two positive numbers, got {widths}")
    return UNet(2, in_channels, num_classes, channels=list(widths), strides=[2] * (len(widths) - 1), num_res_units=2)


def multiple(widths: list[int]) -> int:
    """What the side of an input must divide by (one halving per level below the first)."""
    return 2 ** (len(widths) - 1)


def windows(samples: list[Sample], in_channels: int, scale: float, window: int,
            num_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window of ``window`` px covering each image at the working scale (images smaller than a window are
    padded): (N, C, w, w) pixels and (N, w, w) class indices."""
    from .train import _pad_to

    xs, ys = [], []
    for sample in samples:
        image = read_image(sample.image)
        if image.is_volume:
            raise ValueError(f"{sample.image.name}: the companion U-Net learns from 2D images")
        x = preprocess.prepare(image.array, in_channels, scale)
        y = preprocess.prepare_mask(read_mask(sample.mask, num_classes), scale)[0]
        size = tuple(max(s, window) for s in x.shape[-2:])
        x, y = _pad_to(x, size), _pad_to(y, size)
        for i in grid_starts(x.shape[-2], window):
            for j in grid_starts(x.shape[-1], window):
                xs.append(x[:, i:i + window, j:j + window])
                ys.append(y[i:i + window, j:j + window])
    return torch.stack(xs), torch.stack(ys)


def fit(net: UNet, xs: torch.Tensor, ys: torch.Tensor, steps: int, seed: int = 0, batch_size: int = 4,
        precision: str = "auto", should_stop: Callable[[], bool] | None = None,
        after_step: Callable[[UNet, int], None] | None = None, progress: bool = False) -> int:
    """Train ``net`` for ``steps`` batches of random windows, one random flip/rotation per batch, Adam with cosine
    decay, Dice + cross-entropy. A fixed budget that does not depend on how busy the machine is. ``should_stop``:
    polled every 50 steps; ``after_step(net, step)``: called after each step (1-based; e.g. to keep the weights of
    the best check). Returns the steps run."""
    device = next(net.parameters()).device
    rng = random.Random(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=LAMBDA_DICE)
    # as the engine elsewhere: bf16 only where the device runs it natively (emulated bf16 is slower than fp32)
    precision = resolve_precision(precision, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    net.train()
    for step in tqdm(range(steps), desc="companion", unit="step", disable=not progress):
        if should_stop is not None and step % 50 == 0 and should_stop():
            return step
        priority.yield_point()  # background training gives way to requests between steps
        index = [rng.randrange(len(xs)) for _ in range(batch_size)]
        turns, flip = rng.randrange(4), rng.random() < 0.5
        x = torch.stack([rotate_flip(xs[i], turns, flip) for i in index]).to(device)
        y = torch.stack([rotate_flip(ys[i], turns, flip) for i in index])[:, None].to(device)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step(net, step + 1)
    net.eval()
    return steps


def train_new(widths: list[int], samples: list[Sample], in_channels: int, num_classes: int, scale: float,
              window: int, steps: int, seed: int = 0, batch_size: int = 4, device=None, precision: str = "auto",
              should_stop=None, after_step=None, progress: bool = False) -> tuple[UNet, int]:
    """A companion initialised from ``seed`` and trained on ``samples``: (the network, steps run)."""
    torch.manual_seed(seed)
    xs, ys = windows(samples, in_channels, scale, window, num_classes)
    net = build(widths, in_channels, num_classes).to(device or "cpu")
    done = fit(net, xs, ys, steps, seed, batch_size, precision, should_stop, after_step, progress)
    return net.eval(), done


@torch.inference_mode()
def probabilities(net: UNet, x: torch.Tensor, window: int, batch_size: int = 4,
                  precision: str = "fp32") -> torch.Tensor:
    """Class probabilities (classes, h, w) of one working-scale image ``x`` (1, C, h, w): overlapping windows of
    ``window`` px, Gaussian-blended; under ``precision`` (the model's, as its head: bf16 halves CPU time where
    native)."""
    with _autocast(x.device, resolve_precision(precision, x.device)):
        logits = sliding_window_inference(x, (window, window), batch_size, net, overlap=OVERLAP, mode="gaussian")
    return torch.softmax(logits[0].float(), 0)
