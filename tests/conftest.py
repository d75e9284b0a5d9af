"""Fixtures: tiny random backbones/encoders built here, plus a few real images from ../shared/data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from support import APP_DIR, MONUSEG, need_shared, tiny_unet_model, write_lvit


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

    config = ModelConfig(backbone=str(tiny_unet_dir), text_encoder=str(tiny_encoder_dir), window=32, tile=64, head_dim=16,
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


@pytest.fixture()
def client(tmp_path, tiny_model, lvit_folder, monkeypatch):
    yield from serve(tmp_path, tiny_model, lvit_folder, monkeypatch)


@pytest.fixture()
def two_class_client(tmp_path, tiny_model, lvit_folder, monkeypatch):
    """An app annotating two structures (`--conf labels cell,edge`), started from a binary initial model."""
    yield from serve(tmp_path, tiny_model, lvit_folder, monkeypatch, labels="cell,edge")


@pytest.fixture()
def click_client(tmp_path, tiny_model, lvit_folder, monkeypatch):
    """An app whose heads read clicks (`--conf clicks true`), started from a model without clicks."""
    yield from serve(tmp_path, tiny_model, lvit_folder, monkeypatch, clicks="true")


def serve(tmp_path, tiny_model, lvit_folder, monkeypatch, **conf):
    from fastapi.testclient import TestClient
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    from textdiff.studies import import_lvit

    tiny_model.save(tmp_path / "initial")
    studies = tmp_path / "studies"
    import_lvit(lvit_folder, studies, labels=1)  # case_0 labeled; case_1, case_2 not
    conf = {"model": str(tmp_path / "initial"), "model_dir": str(tmp_path / "published"), "epochs": "2", **conf}
    monkeypatch.setattr(settings, "MONAI_LABEL_APP_DIR", str(APP_DIR))
    monkeypatch.setattr(settings, "MONAI_LABEL_STUDIES", str(studies))
    monkeypatch.setattr(settings, "MONAI_LABEL_APP_CONF", conf)
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTO_UPDATE_SCORING", False)
    monkeypatch.setattr(settings, "MONAI_LABEL_DATASTORE_AUTO_RELOAD", False)  # tests refresh explicitly
    clear_cache()
    from monailabel.app import app

    with TestClient(app, raise_server_exceptions=False) as test_client:
        test_client.studies = studies
        test_client.tmp = tmp_path
        yield test_client
    clear_cache()


