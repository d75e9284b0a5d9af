"""A plain MONAI U-Net trained from scratch on the same labels and augmentation as TextDiff (the baseline of the
label-efficiency curves): the engine's companion U-Net (textdiff.companion), trained and run alone. Same working
scale and windows as the TextDiff model it is compared with; evaluation by the same per-image Dice."""
from __future__ import annotations

import copy

import numpy as np
import torch
from monai.networks.nets import UNet

from textdiff import companion, preprocess
from textdiff.data import Sample, read_image, read_mask
from textdiff.metrics import dice_iou


def train_unet(train: list[Sample], scale: float, window: int = 256, steps: int = 3000, seed: int = 0,
               channels: int = 3, batch_size: int = 4, select_on: list[Sample] | None = None, checks: int = 10) -> UNet:
    """Train for a fixed number of steps (3000 batches of 4 windows is ~10 minutes on a quiet 2-core CPU).
    With `select_on`, the weights of the best of `checks` evenly spaced evaluations on those samples are kept: the
    selection TextDiff's training gets, so that neither side of the comparison has an edge from it."""
    best = {"dice": -1.0, "step": steps, "state": None}

    def check(net: UNet, step: int) -> None:
        if select_on and (step % max(1, steps // checks) == 0 or step == steps):
            result = evaluate_unet(net.eval(), select_on, scale, window, channels)
            net.train()
            if result["dice"] > best["dice"]:
                best.update(dice=result["dice"], step=step, state=copy.deepcopy(net.state_dict()), result=result)

    net, _ = companion.train_new(list(companion.WIDTHS), train, channels, 2, scale, window, steps, seed, batch_size,
                                 after_step=check)
    if select_on:
        net.load_state_dict(best["state"])
    # the selection's own scores of the kept weights, so the caller need not evaluate them again
    net.steps_trained, net.best_step, net.selection_result = steps, best["step"], best.get("result")
    return net.eval()


def unet_probabilities(net: UNet, image, scale: float, window: int = 256, channels: int = 3) -> torch.Tensor:
    """Class probabilities (classes, H, W) at the image's own size, by the same sliding windows as TextDiff."""
    x = preprocess.prepare(image.array, channels, scale)[None]
    return preprocess.resize_to(companion.probabilities(net, x, window), image.size_hw)


def evaluate_unet(net: UNet, samples: list[Sample], scale: float, window: int = 256, channels: int = 3) -> dict:
    per_image = {}
    for sample in samples:
        probs = unet_probabilities(net, read_image(sample.image), scale, window, channels)
        dice, iou = dice_iou(probs.argmax(0).numpy(), read_mask(sample.mask))
        per_image[sample.name] = {"dice": dice, "iou": iou}
    return {"dice": float(np.mean([v["dice"] for v in per_image.values()])),
            "iou": float(np.mean([v["iou"] for v in per_image.values()])), "n": len(per_image), "per_image": per_image}
