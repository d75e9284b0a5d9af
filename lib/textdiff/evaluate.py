"""Evaluation at native resolution (the same path as inference) and overlay pictures a person can check."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .clicks import corrective_click
from .data import Sample, read_image, read_mask
from .metrics import dice_iou_per_class
from .model import TextDiffModel


def evaluate(model: TextDiffModel, samples: list[Sample], overlays: str | Path | None = None,
             progress: bool = True, use_reports: bool = True, clicks: list[int] | None = None,
             regions: dict[str, list[str]] | None = None) -> dict:
    """Per-image Dice / IoU (mean over the foreground classes) and their means over the images; ``per_class``:
    each foreground class's mean over the images, by label name. ``clicks`` (counts, e.g. [0, 1, 3]): also
    ``dice_by_clicks``, the mean Dice after that many simulated corrective clicks per image (see
    ``textdiff.clicks.corrective_click``); the backbone runs once per image, the clicks rerun only a head that reads
    them. ``regions`` (name -> label names): also ``per_region``, the mean Dice / IoU of each union of classes, as
    nested structures are scored (e.g. the whole lung field = uninfected lung + infection, as BraTS scores the
    whole tumour)."""
    region_classes = region_indices(model.config.labels, regions or {})
    per_region = {name: {"dice": [], "iou": []} for name in region_classes}
    names = [name for name, index in sorted(model.config.labels.items(), key=lambda item: item[1]) if index]
    per_image, per_class = {}, {name: {"dice": [], "iou": []} for name in names}
    by_clicks: dict[int, list[float]] = {count: [] for count in sorted(set(clicks or []))}
    if by_clicks:
        if any(count < 0 for count in by_clicks):
            raise ValueError("click counts must be >= 0")
        kept = model.memory
        model.keep_features(256)  # the image's windows: each click round runs only the head
    for sample in tqdm(samples, desc="evaluate", unit="img", disable=not progress):
        image = read_image(sample.image)
        truth = read_mask(sample.mask, model.config.num_classes)
        report = sample.report if use_reports else None
        probs = model.predict_image_proba(image, report)
        label = model.label_from(probs)
        dices, ious = dice_iou_per_class(label, truth, model.config.num_classes)
        dice, iou = float(np.mean(dices)), float(np.mean(ious))
        per_image[sample.name] = {"dice": round(dice, 4), "iou": round(iou, 4)}
        for name, class_dice, class_iou in zip(names, dices, ious):
            per_class[name]["dice"].append(class_dice)
            per_class[name]["iou"].append(class_iou)
        for name, indices in region_classes.items():
            region_dice, region_iou = dice_iou_per_class(np.isin(label, indices), np.isin(truth, indices))
            per_region[name]["dice"].append(region_dice[0])
            per_region[name]["iou"].append(region_iou[0])
        if by_clicks:
            corrected, placed = label, []
            for count in range(max(by_clicks) + 1):
                click = corrective_click(corrected, truth) if count else None
                if click is not None:
                    placed.append(click)
                    # a head that reads clicks answers anew; any other one's probabilities stay as they were
                    clicked = model.predict_image_proba(image, report, clicks=placed) if model.config.clicks else probs
                    corrected = model.label_from(clicked, placed)
                if count in by_clicks:
                    by_clicks[count].append(float(np.mean(dice_iou_per_class(corrected, truth,
                                                                             model.config.num_classes)[0])))
        if overlays:
            save_overlay(image.array, truth, label, Path(overlays) / (Path(sample.name).stem + ".png"),
                         f"{sample.name}  Dice {dice:.3f}", report)
    if by_clicks:
        model.memory = kept
    return {"dice": float(np.mean([v["dice"] for v in per_image.values()])),
            "iou": float(np.mean([v["iou"] for v in per_image.values()])),
            "n": len(per_image), "per_image": per_image,
            "per_class": {name: {metric: float(np.mean(values)) for metric, values in scores.items()}
                          for name, scores in per_class.items()},
            **({"per_region": {name: {metric: float(np.mean(values)) for metric, values in scores.items()}
                               for name, scores in per_region.items()}} if per_region else {}),
            **({"dice_by_clicks": {count: float(np.mean(v)) for count, v in by_clicks.items()}} if by_clicks else {})}


def region_indices(labels: dict[str, int], regions: dict[str, list[str]]) -> dict[str, list[int]]:
    """The class indices of each region; a name that is no foreground label of the model is refused."""
    foreground = {name: index for name, index in labels.items() if index}
    indices = {}
    for region, members in regions.items():
        unknown = [name for name in members if name not in foreground]
        if unknown or not members:
            raise ValueError(f"region {region!r}: {unknown or 'no classes'} not among the model's labels "
                             f"{sorted(foreground)}")
        indices[region] = sorted({foreground[name] for name in members})
    return indices


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
