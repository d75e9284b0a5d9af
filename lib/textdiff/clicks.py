"""Annotator clicks: each click says "this pixel is class k". Every model turns a click into a region: the pixels
connected to it that the model holds no surer of their current class than the clicked one take class k
(``correct_regions``). A model trained with clicks also reads them: one disk map per class beside the clean image.
Training places clicks on the head's own errors (as DeepEdit trains), evaluation places them where a careful
annotator would: inside the largest error region, at its most interior pixel.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

MAX_CLICKS = 200  # per request or file: more is not an annotator's correction
MAX_REGION = 0.1  # of the image: a click on a pixel the model is sure of would otherwise take over everything as
# sure; such a click changes a disk of the model's click radius instead
REACH = 4.0  # a click's region ends this many times the click's depth inside it away from the click: touching
# objects (nuclei in a clump) are not taken with the one clicked. MoNuSeg Val, the monuseg recipe's head, Dice
# after 5 clicks (0.7817 without): reach 2: 0.7832, 4: 0.7844, 8: 0.7835, no limit: 0.7810


@dataclass(frozen=True)
class Click:
    y: float  # row, in the pixels of the image the click was made on
    x: float  # column
    label: int  # class index (0 = background)


def click_maps(clicks: list[Click], shape_hw: tuple[int, int], num_classes: int, radius: float,
               scale: float = 1.0) -> torch.Tensor:
    """(num_classes, H, W) float maps of a working image of ``shape_hw``: 1 within ``radius`` working pixels of a
    click of that class. ``scale``: working pixels per pixel of the clicks' image."""
    maps = torch.zeros(num_classes, *shape_hw)
    if not clicks:
        return maps
    rows = torch.arange(shape_hw[0]).view(-1, 1).float()
    cols = torch.arange(shape_hw[1]).view(1, -1).float()
    for click in clicks:
        # pixel centres: a click at native pixel (y, x) lies at ((y + 0.5) * scale - 0.5) in working pixels
        cy, cx = (click.y + 0.5) * scale - 0.5, (click.x + 0.5) * scale - 0.5
        maps[click.label] = torch.maximum(maps[click.label],
                                          (((rows - cy) ** 2 + (cols - cx) ** 2) <= radius ** 2).float())
    return maps


def correct_regions(label: np.ndarray, probs: torch.Tensor, clicks: list[Click], radius: float) -> np.ndarray:
    """The label map (H, W) after each click in turn: the clicked pixel's region, i.e. the pixels connected to it,
    of its current class c, whose probability of c is at most the clicked pixel's, within ``REACH`` times the
    click's depth in that set, takes the click's class (a false region the model doubts as much goes whole; a
    missed region grows as far as the model leans the click's way). ``probs`` (classes, H, W) at the label map's
    size; ``radius`` (pixels): the least depth, and the disk a click changes when its region would exceed
    ``MAX_REGION`` of the image."""
    label = label.copy()
    probs = probs.numpy() if isinstance(probs, torch.Tensor) else probs
    rows, cols = np.ogrid[: label.shape[0], : label.shape[1]]
    for click in clicks:
        y, x = min(int(round(click.y)), label.shape[0] - 1), min(int(round(click.x)), label.shape[1] - 1)
        current = int(label[y, x])
        if current == click.label:
            continue
        doubted = (label == current) & (probs[current] <= probs[current, y, x])
        regions, _ = ndimage.label(doubted)
        region = regions == regions[y, x]
        ys, xs = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
        top, left = max(ys[0] - 1, 0), max(xs[0] - 1, 0)  # the depth needs only the region's box and its rim
        depth = ndimage.distance_transform_edt(region[top:ys[-1] + 2, left:xs[-1] + 2])[y - top, x - left]
        region &= (rows - y) ** 2 + (cols - x) ** 2 <= (REACH * max(float(depth), radius)) ** 2
        if region.sum() > MAX_REGION * label.size:
            region = (label == current) & ((rows - y) ** 2 + (cols - x) ** 2 <= radius ** 2)
        label[region] = click.label
    return label


def corrective_click(prediction: np.ndarray, truth: np.ndarray) -> Click | None:
    """Where an annotator clicks next: inside the largest connected region the prediction gets wrong, at the pixel
    farthest from its border, labelled with the true class there; None when nothing is wrong."""
    wrong = prediction != truth
    if not wrong.any():
        return None
    regions, count = ndimage.label(wrong)
    sizes = ndimage.sum_labels(wrong, regions, index=np.arange(1, count + 1))
    largest = regions == (int(np.argmax(sizes)) + 1)
    depth = ndimage.distance_transform_edt(np.pad(largest, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
    return Click(float(y), float(x), int(truth[y, x]))


def training_clicks(prediction: torch.Tensor, target: torch.Tensor, rng: random.Random,
                    most: int = 3) -> list[list[Click]]:
    """Per window (B, H, W) of working-scale labels: none half of the time (the model must also work without
    clicks), else 1..``most`` corrective clicks placed one after another on the errors left by the earlier ones
    (each click's region counts as corrected)."""
    out = []
    for pred, truth in zip(prediction.cpu().numpy(), target.cpu().numpy()):
        clicks: list[Click] = []
        if rng.random() >= 0.5:
            pred = pred.copy()
            for _ in range(rng.randint(1, most)):
                click = corrective_click(pred, truth)
                if click is None:
                    break
                clicks.append(click)
                regions, _ = ndimage.label(pred != truth)
                fixed = regions == regions[int(click.y), int(click.x)]
                pred[fixed] = truth[fixed]
        out.append(clicks)
    return out


def parse_clicks(items, labels: dict[str, int], shape_hw: tuple[int, int]) -> list[Click]:
    """Clicks from JSON-like items ``{"y": row, "x": column, "label": name or index}``, checked: numbers finite and
    inside the image, labels known, at most MAX_CLICKS. Raises ValueError saying what is wrong."""
    if not isinstance(items, list):
        raise ValueError("clicks must be a list of {y, x, label}")
    if len(items) > MAX_CLICKS:
        raise ValueError(f"{len(items)} clicks: at most {MAX_CLICKS}")
    by_index = {index: index for index in labels.values()}
    out = []
    for n, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"y", "x", "label"} or not {"y", "x", "label"} <= set(item):
            raise ValueError(f"click {n}: expected keys y, x, label, got {item!r}"[:200])
        y, x, label = item["y"], item["x"], item["label"]
        if isinstance(y, bool) or isinstance(x, bool) or not all(isinstance(v, (int, float)) for v in (y, x)) \
                or not all(np.isfinite(v) for v in (y, x)):
            raise ValueError(f"click {n}: y and x must be finite numbers")
        if not (0 <= y < shape_hw[0] and 0 <= x < shape_hw[1]):
            raise ValueError(f"click {n}: ({y}, {x}) is outside the {shape_hw[0]}x{shape_hw[1]} image")
        index = labels.get(label) if isinstance(label, str) else by_index.get(label)
        if index is None or isinstance(label, bool):
            raise ValueError(f"click {n}: unknown label {label!r} (one of {', '.join(labels)})"[:200])
        out.append(Click(float(y), float(x), int(index)))
    return out


def read_clicks(path: str | Path, labels: dict[str, int], shape_hw: tuple[int, int]) -> list[Click]:
    """A clicks file: a JSON list of ``{"y": row, "x": column, "label": name or index}`` in the image's pixels."""
    return parse_clicks(json.loads(Path(path).read_text()), labels, shape_hw)
