"""Turning an LViT-format split into a MONAI Label studies folder (images, final labels, reports in image info).

This is the one engine module that talks to MONAI Label (its LocalDatastore API), imported only by
``textdiff import-lvit``.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .data import read_lvit, read_mask

STUDY_EXTENSIONS = ("*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.nii.gz", "*.nii", "*.nrrd", "*.dcm")
REPORT_KEY = "report"


def open_datastore(studies: str | Path):
    try:
        from monailabel.datastore.local import LocalDatastore
    except ImportError as error:
        raise RuntimeError("import-lvit needs MONAI Label: pip install -e '.[app]'") from error
    Path(studies).mkdir(parents=True, exist_ok=True)
    return LocalDatastore(str(studies), extensions=STUDY_EXTENSIONS, auto_reload=False)


def import_lvit(folder: str | Path, studies: str | Path, labels: bool | int = True) -> dict:
    """Copy images (+ masks as 0/255 PNG final labels) and store each report under image info 'report'.

    ``labels``: True for all, False for none, or N to import only the first N masks (the rest stay unlabeled).
    """
    samples = read_lvit(folder, require_masks=False)
    datastore = open_datastore(studies)
    limit = len(samples) if labels is True else int(labels)
    imported = labeled = 0
    for index, sample in enumerate(samples):
        image_id = sample.image.name.split(".")[0]
        datastore.add_image(image_id, str(sample.image), {REPORT_KEY: sample.report or ""})
        imported += 1
        if index < limit and sample.mask is not None:
            mask = read_mask(sample.mask)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{image_id}.png"
                sitk.WriteImage(sitk.GetImageFromArray((mask * 255).astype(np.uint8)), str(path))
                datastore.save_label(image_id, str(path), "final", {})
            labeled += 1
    return {"images": imported, "labeled": labeled, "studies": str(Path(studies).resolve())}
