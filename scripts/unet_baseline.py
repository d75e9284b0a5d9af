"""A plain MONAI U-Net trained from scratch on the same labels and augmentation as TextDiff (the baseline of the
label-efficiency curves). Same working scale and windows as the TextDiff model it is compared with; inference by the
same sliding windows; evaluation by the same per-image Dice."""
from __future__ import annotations

import copy
import random

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from textdiff import preprocess
from textdiff.backbone import resolve_precision
from textdiff.data import Sample, read_image, read_mask
from textdiff.head import rotate_flip
from textdiff.metrics import dice_iou
from textdiff.preprocess import grid_starts
from textdiff.train import _pad_to


def _tiles(samples: list[Sample], scale: float, window: int, channels: int):
    xs, ys = [], []
    for sample in samples:
        image = read_image(sample.image)
        x = preprocess.prepare(image.array, channels, scale)
        y = preprocess.prepare_mask(read_mask(sample.mask), scale)[0]
        size = tuple(max(s, window) for s in x.shape[-2:])  # images smaller than a window are padded
        x, y = _pad_to(x, size), _pad_to(y, size)
        for i in grid_starts(x.shape[-2], window):
            for j in grid_starts(x.shape[-1], window):
                xs.append(x[:, i:i + window, j:j + window])
                ys.append(y[i:i + window, j:j + window])
    return torch.stack(xs), torch.stack(ys)


def train_unet(train: list[Sample], scale: float, window: int = 256, steps: int = 3000, seed: int = 0,
               channels: int = 3, batch_size: int = 4, select_on: list[Sample] | None = None, checks: int = 10) -> UNet:
    """Train for a fixed number of steps (a budget that does not depend on how busy the machine is; 3000 batches of
    4 windows is ~10 minutes on a quiet 2-core CPU), random dihedral augmentation, cosine learning-rate decay.
    With `select_on`, the weights of the best of `checks` evenly spaced evaluations on those samples are kept: the
    selection TextDiff's training gets, so that neither side of the comparison has an edge from it."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    xs, ys = _tiles(train, scale, window, channels)
    net = UNet(2, channels, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=1.5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    best = {"dice": -1.0, "step": steps, "state": None}
    # as the engine: bf16 only where the CPU runs it natively (emulated bf16 is slower than fp32)
    use_bf16 = resolve_precision("auto", torch.device("cpu")) == "bf16"
    for step in range(steps):
        index = [rng.randrange(len(xs)) for _ in range(batch_size)]
        turns, flip = rng.randrange(4), rng.random() < 0.5
        x = torch.stack([rotate_flip(xs[i], turns, flip) for i in index])
        y = torch.stack([rotate_flip(ys[i], turns, flip) for i in index])[:, None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if select_on and ((step + 1) % max(1, steps // checks) == 0 or step + 1 == steps):
            result = evaluate_unet(net.eval(), select_on, scale, window, channels)
            net.train()
            if result["dice"] > best["dice"]:
                best = {"dice": result["dice"], "step": step + 1, "state": copy.deepcopy(net.state_dict()),
                        "result": result}
    if select_on:
        net.load_state_dict(best["state"])
    # the selection's own scores of the kept weights, so the caller need not evaluate them again
    net.steps_trained, net.best_step, net.selection_result = steps, best["step"], best.get("result")
    return net.eval()


@torch.inference_mode()
def unet_probabilities(net: UNet, image, scale: float, window: int = 256, channels: int = 3) -> torch.Tensor:
    """Class probabilities (classes, H, W) at the image's own size, by the same sliding windows as TextDiff."""
    x = preprocess.prepare(image.array, channels, scale)[None]
    logits = sliding_window_inference(x, (window, window), 4, net, overlap=0.25, mode="gaussian")
    return preprocess.resize_to(torch.softmax(logits[0].float(), 0), image.size_hw)


def evaluate_unet(net: UNet, samples: list[Sample], scale: float, window: int = 256, channels: int = 3) -> dict:
    per_image = {}
    for sample in samples:
        probs = unet_probabilities(net, read_image(sample.image), scale, window, channels)
        dice, iou = dice_iou(probs.argmax(0).numpy(), read_mask(sample.mask))
        per_image[sample.name] = {"dice": dice, "iou": iou}
    return {"dice": float(np.mean([v["dice"] for v in per_image.values()])),
            "iou": float(np.mean([v["iou"] for v in per_image.values()])), "n": len(per_image), "per_image": per_image}
