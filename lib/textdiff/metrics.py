"""Per-image foreground Dice and IoU (as LViT and TextDiff report them), via MONAI's metrics."""
from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice, compute_iou


def _one_hot(label: np.ndarray, num_classes: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(label)).long()
    return torch.nn.functional.one_hot(t, num_classes).movedim(-1, 0)[None].float()


def dice_iou_per_class(prediction: np.ndarray, truth: np.ndarray, num_classes: int = 2) -> tuple[list, list]:
    """Dice and IoU of each foreground class (1..C-1); a class empty in both truth and prediction scores 1."""
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in size")
    p, t = _one_hot(prediction, num_classes), _one_hot(truth, num_classes)
    dice = compute_dice(p, t, include_background=False, ignore_empty=False)
    iou = compute_iou(p, t, include_background=False, ignore_empty=False)
    return dice[0].tolist(), iou[0].tolist()


def dice_iou(prediction: np.ndarray, truth: np.ndarray, num_classes: int = 2) -> tuple[float, float]:
    """Mean over foreground classes; an image whose truth and prediction are both empty scores 1."""
    dice, iou = dice_iou_per_class(prediction, truth, num_classes)
    return float(np.mean(dice)), float(np.mean(iou))
