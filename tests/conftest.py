"""Fixtures: tiny random backbones/encoders built here, plus a few real images from ../shared/data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from support import MONUSEG, need_shared, tiny_unet_model, write_lvit


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_unet")
    tiny_unet_model().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A 1-layer, 32-d BERT with the embedded MiniLM tokenizer (real word pieces, random weights)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from textdiff.text import default_encoder_path

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(default_encoder_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_model(tiny_unet_dir, tiny_encoder_dir):
    from textdiff.model import ModelConfig, TextDiffModel

    config = ModelConfig(backbone=str(tiny_unet_dir), text_encoder=str(tiny_encoder_dir), window=32, head_dim=16,
                         precision="fp32")
    torch.manual_seed(0)
    return TextDiffModel.build(config, "cpu")




@pytest.fixture(scope="session")
def monuseg_crops():
    """Three 96x96 crops of real MoNuSeg tiles with their masks ({0,255}) and reports."""
    need_shared()
    from textdiff.data import read_image, read_lvit, read_mask

    out = []
    for sample in read_lvit(MONUSEG / "Train_Folder")[:3]:
        image = read_image(sample.image).array[300:396, 300:396]
        mask = read_mask(sample.mask)[300:396, 300:396] * 255
        out.append((np.ascontiguousarray(image), np.ascontiguousarray(mask), sample.report))
    return out


@pytest.fixture()
def lvit_folder(tmp_path, monuseg_crops) -> Path:
    images, masks, reports = zip(*monuseg_crops)
    return write_lvit(tmp_path / "Train_Folder", list(images), list(masks), list(reports))
