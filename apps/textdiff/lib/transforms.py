"""The app's transforms, shared by infer, train and scoring: request/datastore records -> engine inputs.

Pixels are never touched here: intensity, channels and working scale live in ``textdiff.preprocess`` and are
applied by the engine with the model folder's parameters.
"""
from __future__ import annotations

import json
from pathlib import Path

from fastapi import HTTPException

from textdiff.data import ImageReadError, Sample, read_image, read_mask
from textdiff.studies import REPORT_KEY
from textdiff.text import clean_report


def bad_request(message: str) -> HTTPException:
    return HTTPException(status_code=400, detail=message)


def load_image(path: str, max_pixels: int):
    """Engine image (pixels + geometry); unreadable input becomes a 400 that says why."""
    try:
        return read_image(path, max_pixels)
    except ImageReadError as error:
        raise bad_request(f"cannot use this image: {error}") from None


def resolve_report(params_report, stored_report, max_chars: int) -> tuple[str | None, str]:
    """The report to use and where it came from: the request, the datastore, or none (no-text path)."""
    if params_report is not None and not isinstance(params_report, str):
        raise bad_request("params.report must be a string")
    for text, source in ((params_report, "request"), (stored_report, "datastore")):
        cleaned = clean_report(text[: max_chars * 2] if isinstance(text, str) else None)
        if cleaned:
            return cleaned[:max_chars], source
    return None, "none"


def stored_report(datastore, image_id: str | None) -> str | None:
    if not image_id:
        return None
    try:
        return datastore.get_image_info(image_id).get(REPORT_KEY)
    except Exception:  # unknown id or a datastore without info
        return None


def labeled_samples(datastore, tag: str = "final") -> list[Sample]:
    """Every image with a label under ``tag``, with its report (PNG 0/255 and Slicer .nii.gz labels alike)."""
    samples = []
    for image_id in sorted(datastore.get_labeled_images(label_tag=tag)):
        label_id = datastore.get_label_by_image_id(image_id, tag)
        if not label_id:
            continue
        samples.append(Sample(Path(datastore.get_image_uri(image_id)), Path(datastore.get_label_uri(label_id, tag)),
                              stored_report(datastore, image_id)))
    return samples


def unlabeled_samples(datastore, limit: int, seed: int = 0) -> list[Sample]:
    """Up to ``limit`` images without a final label (a seeded random choice), with their reports; never a mask."""
    import random

    ids = sorted(datastore.get_unlabeled_images())
    chosen = sorted(random.Random(seed).sample(ids, limit)) if len(ids) > limit else ids
    return [Sample(Path(datastore.get_image_uri(i)), None, stored_report(datastore, i)) for i in chosen]


def check_label(label_path: str, image_path: str, num_classes: int, max_pixels: int) -> None:
    """Refuse (400) a label that is not a label map or whose size differs from its image."""
    try:
        label = read_mask(label_path, num_classes)
    except (ImageReadError, ValueError) as error:
        raise bad_request(f"label refused: {error}") from None
    image = load_image(image_path, max_pixels)
    expected = image.array.shape if image.is_volume else image.size_hw
    if tuple(label.shape) != tuple(expected):
        raise bad_request(f"label refused: its size {tuple(label.shape)} differs from the image's {tuple(expected)}")


def parse_params(raw) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError as error:
        raise bad_request(f"params is not valid JSON: {error.msg}") from None
    if not isinstance(value, dict):
        raise bad_request("params must be a JSON object")
    return value
