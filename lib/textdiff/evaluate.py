"""Evaluation at native resolution (the same path as inference) and overlay pictures a person can check."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .data import Sample, read_image, read_mask
from .metrics import dice_iou_per_class
from .model import TextDiffModel


def evaluate(model: TextDiffModel, samples: list[Sample], overlays: str | Path | None = None,
             progress: bool = True, use_reports: bool = True) -> dict:
    """Per-image Dice / IoU (mean over the foreground classes) and their means over the images; ``per_class``:
    each foreground class's mean over the images, by label name."""
    names = [name for name, index in sorted(model.config.labels.items(), key=lambda item: item[1]) if index]
    per_image, per_class = {}, {name: {"dice": [], "iou": []} for name in names}
    for sample in tqdm(samples, desc="evaluate", unit="img", disable=not progress):
        image = read_image(sample.image)
        truth = read_mask(sample.mask, model.config.num_classes)
        report = sample.report if use_reports else None
        label = model.predict(image, report)
        dices, ious = dice_iou_per_class(label, truth, model.config.num_classes)
        dice, iou = float(np.mean(dices)), float(np.mean(ious))
        per_image[sample.name] = {"dice": round(dice, 4), "iou": round(iou, 4)}
        for name, class_dice, class_iou in zip(names, dices, ious):
            per_class[name]["dice"].append(class_dice)
            per_class[name]["iou"].append(class_iou)
        if overlays:
            save_overlay(image.array, truth, label, Path(overlays) / (Path(sample.name).stem + ".png"),
                         f"{sample.name}  Dice {dice:.3f}", report)
    return {"dice": float(np.mean([v["dice"] for v in per_image.values()])),
            "iou": float(np.mean([v["iou"] for v in per_image.values()])),
            "n": len(per_image), "per_image": per_image,
            "per_class": {name: {metric: float(np.mean(values)) for metric, values in scores.items()}
                          for name, scores in per_class.items()}}


def save_overlay(pixels: np.ndarray, truth: np.ndarray, label: np.ndarray, path: Path, title: str,
                 report: str | None = None) -> Path:
    """Image | image + ground-truth contour (green) + prediction contour (magenta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    shown = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    cmap = "gray" if shown.ndim == 2 else None
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4), dpi=110)
    for ax in axes:
        ax.imshow(shown, cmap=cmap)
        ax.set_axis_off()
    axes[0].set_title("image")
    axes[1].contour(truth > 0, levels=[0.5], colors="lime", linewidths=0.8)
    axes[1].contour(label > 0, levels=[0.5], colors="magenta", linewidths=0.8)
    axes[1].set_title("ground truth (green) / prediction (magenta)")
    fig.suptitle(title + (f"\n\"{report}\"" if report else "\n(no report)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
