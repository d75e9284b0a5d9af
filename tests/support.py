"""Helpers shared by the tests: tiny random models, small LViT folders, the path to ../shared/data."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MONUSEG = SHARED / "monuseg"


def tiny_unet_model(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8)



def write_lvit(folder: Path, images: list[np.ndarray], masks: list[np.ndarray], reports: list[str], split="Train"):
    """A small LViT-format folder (img/, labelcol/, <split>_text.xlsx)."""
    import openpyxl
    from PIL import Image as PILImage

    (folder / "img").mkdir(parents=True)
    (folder / "labelcol").mkdir()
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Image", "Description"])
    for i, (image, mask, report) in enumerate(zip(images, masks, reports)):
        name = f"case_{i}.png"
        PILImage.fromarray(image).save(folder / "img" / name)
        PILImage.fromarray(mask).save(folder / "labelcol" / name)
        sheet.append([name, report])
    book.save(folder / f"{split}_text.xlsx")
    return folder

def need_shared():
    if not MONUSEG.is_dir():
        pytest.skip(f"real data not found at {SHARED} (the tests read it from ../shared/data)")



APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "textdiff"


def infer_json(client, image, **params):
    response = client.post(f"/infer/textdiff?image={image}&output=json", data={"params": json.dumps(params)})
    assert response.status_code == 200, response.text
    return response.json()


def infer_label(client, image, **params) -> sitk.Image:
    response = client.post(f"/infer/textdiff?image={image}&output=image", data={"params": json.dumps(params)})
    assert response.status_code == 200, response.text
    suffix = params.get("result_extension", ".png")
    path = client.tmp / f"result{suffix}"
    path.write_bytes(response.content)
    return sitk.ReadImage(str(path))


def put_label(client, image, array: np.ndarray, name="label.nii.gz"):
    path = client.tmp / name
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with open(path, "rb") as handle:
        return client.put(f"/datastore/label?image={image}", files={"label": (name, handle)})


