"""DDPM pretraining: checkpoint + resume, a loadable backbone, and DDP with 2 CPU processes under torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from textdiff.cli import main
from textdiff.pretrain import find_images

TINY = ["--channels", "8,16", "--size", "32", "--batch-size", "2", "--checkpoint-every", "2"]


@pytest.fixture()
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "labels" / "final").mkdir(parents=True)
    for i in range(3):
        PILImage.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    PILImage.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(folder / "grey.png")
    PILImage.fromarray(np.zeros((48, 40), np.uint8)).save(folder / "labels" / "final" / "img0.png")
    return folder


def test_find_images_skips_label_folders(image_folder):
    found = find_images([str(image_folder)])
    assert len(found) == 4 and all("labels" not in p.parts for p in found)


def test_pretrain_checkpoints_resumes_and_writes_a_backbone(image_folder, tmp_path):
    from diffusers import UNet2DModel

    out = tmp_path / "backbone"
    assert main(["pretrain", "--images", str(image_folder), "--out", str(out), "--steps", "3", *TINY]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["step"] == 3 and recipe["final"] and recipe["wall_s"] > 0
    first = torch.load(out / "checkpoint.pt", weights_only=True)
    assert main(["pretrain", "--images", str(image_folder), "--out", str(out), "--steps", "5", "--resume", *TINY]) == 0
    resumed = torch.load(out / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == 5 and first["step"] == 3
    unet = UNet2DModel.from_pretrained(out)  # the EMA weights, loadable as a backbone
    assert unet.config.block_out_channels == [8, 16]


def test_pretrain_under_torchrun_with_two_cpu_processes(image_folder, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "textdiff.cli", "pretrain", "--images", str(image_folder), "--out", str(out), "--steps", "2", *TINY]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["world_size"] == 2 and recipe["step"] == 2


def test_ema_follows_the_weights_in_a_short_pretraining(image_folder, tmp_path):
    """A plain 0.999 EMA of a short run is still mostly its random init (0.999^1200 = 30 % of it after 1200
    steps): the backbone it saves would be barely trained. With the warm-up the EMA moves with the weights."""
    out = tmp_path / "backbone"
    assert main(["pretrain", "--images", str(image_folder), "--out", str(out), "--steps", "30", "--lr", "1e-2",
                 *TINY]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.manual_seed(0)  # the pretraining builds its UNet under seed 0 too: its init, rebuilt
    from diffusers import UNet2DModel

    from textdiff.pretrain import unet_config

    init = UNet2DModel(sample_size=32, **unet_config([8, 16])).state_dict()
    ema = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    moved = sum((state["unet"][k].float() - init[k].float()).norm() ** 2 for k in init) ** 0.5
    ema_moved = sum((ema[k].float() - init[k].float()).norm() ** 2 for k in init) ** 0.5
    assert moved > 0
    assert ema_moved > 0.5 * moved  # plain 0.999 EMA: ~0.2


def test_pretrain_from_an_existing_backbone_keeps_its_architecture_and_weights(image_folder, tmp_path,
                                                                              tiny_unet_dir, capsys):
    """--init adapts a backbone rather than starting from random weights: with a zero learning rate the saved
    EMA is exactly the starting backbone, in its own architecture (not the default widths)."""
    from diffusers import UNet2DModel

    from textdiff.backbone import load_unet, weights_digest

    out = tmp_path / "adapted"
    assert main(["pretrain", "--images", str(image_folder), "--out", str(out), "--steps", "2", "--lr", "0",
                 "--size", "32", "--batch-size", "2", "--init", str(tiny_unet_dir)]) == 0
    start, adapted = load_unet(tiny_unet_dir), UNet2DModel.from_pretrained(out)
    assert adapted.config.block_out_channels == start.config.block_out_channels
    assert weights_digest(adapted).hexdigest() == weights_digest(start).hexdigest()
    assert json.loads((out / "recipe.json").read_text())["init_digest"] == weights_digest(start).hexdigest()[:12]
    assert main(["pretrain", "--images", str(image_folder), "--out", str(tmp_path / "refused"), "--init",
                 str(tiny_unet_dir), "--channels", "8,16"]) == 2
    assert "--init" in capsys.readouterr().err and not (tmp_path / "refused").exists()
