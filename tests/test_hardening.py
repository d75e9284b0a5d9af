"""Hostile inputs get a clear 4xx (never a 500 or a traceback); odd reports are cleaned; labels stay intact;
concurrent infers agree; a killed training leaves the published model intact."""
from __future__ import annotations

import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import SimpleITK as sitk

from support import infer_json, put_label


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (a decompression bomb's header) with a tiny IDAT."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _upload(client, name, payload, params=None):
    return client.post("/infer/textdiff?output=json", files={"file": (name, payload)},
                       data={"params": json.dumps(params or {})})


def _assert_clear_4xx(response, *words):
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    detail = response.json()["detail"]
    assert "Traceback" not in detail and all(w in detail for w in words), detail


def test_broken_uploads_are_refused_clearly(client, tmp_path):
    real = (client.studies / "case_1.png").read_bytes()
    _assert_clear_4xx(_upload(client, "empty.png", b""), "empty")
    _assert_clear_4xx(_upload(client, "text.png", b"this is not an image at all"), "not a readable image")
    _assert_clear_4xx(_upload(client, "cut.png", real[: len(real) // 2]), "truncated or corrupt")
    _assert_clear_4xx(_upload(client, "bomb.png", _png_header_only(20000, 20000)), "limit")
    nan = sitk.GetImageFromArray(np.full((64, 64), np.nan, np.float32))
    sitk.WriteImage(nan, str(tmp_path / "nan.nrrd"))
    _assert_clear_4xx(_upload(client, "nan.nrrd", (tmp_path / "nan.nrrd").read_bytes()), "NaN")


def test_unknown_ids_and_bad_params_are_4xx(client, monkeypatch):
    _assert_clear_4xx(client.post("/infer/textdiff?image=no_such_image&output=json"), "unknown image")
    _assert_clear_4xx(client.post("/infer/no_such_model?image=case_1&output=json"), "unknown model")
    _assert_clear_4xx(client.post("/infer/textdiff?image=case_1&output=json", data={"params": "{not json"}), "JSON")
    _assert_clear_4xx(client.post("/infer/textdiff?image=case_1&output=json", data={"params": "[1, 2]"}), "object")
    _assert_clear_4xx(client.post("/infer/textdiff?image=case_1&output=json",
                                  data={"params": json.dumps({"report": 42})}), "string")
    from textdiff.model import TextDiffModel

    runs = []  # a bad output format is refused before the model runs, not after
    real_predict = TextDiffModel.predict
    monkeypatch.setattr(TextDiffModel, "predict", lambda self, *a, **k: runs.append(1) or real_predict(self, *a, **k))
    for params, word in (({"result_extension": ".exe"}, "result_extension"), ({"result_dtype": "int8"}, "result_dtype")):
        _assert_clear_4xx(client.post("/infer/textdiff?image=case_1&output=json",
                                      data={"params": json.dumps(params)}), word)
    assert not runs
    assert infer_json(client, "case_1") and runs == [1]  # the counter does see a good request


@pytest.mark.parametrize("report", ["", "x" * 100_000, "双侧肺部感染，左下肺。", "Лёгкое", "a\x00b\x07c\r\n\td",
                                    "\x00\x00"])
def test_odd_reports_are_cleaned_and_answered(client, report):
    result = infer_json(client, "case_1", report=report)
    if result["report"] is not None:
        assert "\x00" not in result["report"] and len(result["report"]) <= 4000


def test_bad_labels_leave_the_stored_label_untouched(client):
    stored = client.studies / "labels" / "final" / "case_0.png"
    before = stored.read_bytes()
    assert put_label(client, "case_0", np.zeros((1, 10, 10), np.uint8)).status_code == 400
    assert put_label(client, "case_0", np.full((1, 96, 96), 3, np.uint8)).status_code == 400
    assert put_label(client, "case_0", np.full((1, 96, 96), 0.25, np.float32)).status_code == 400
    assert put_label(client, "no_such_image", np.zeros((1, 96, 96), np.uint8)).status_code == 400
    assert stored.read_bytes() == before


def test_concurrent_infers_agree(client):
    def one(_):
        response = client.post("/infer/textdiff?image=case_1&output=image",
                               data={"params": json.dumps({"report": "dense nuclei"})})
        return response.status_code, response.content

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(20)))
    assert all(status == 200 for status, _ in results)
    assert len({content for _, content in results}) == 1


def test_training_killed_midway_leaves_published_model_intact(tiny_model, lvit_folder, tiny_unet_dir,
                                                              tiny_encoder_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from textdiff.model import TextDiffModel

    published = tmp_path / "model"
    tiny_model.save(published)
    before = {p.name: p.read_bytes() for p in published.iterdir()}
    image = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    expected = TextDiffModel.load(published, "cpu").predict_proba(image, "x")
    command = [sys.executable, "-m", "textdiff.cli", "train", "--data", str(lvit_folder), "--out", str(published),
               "--backbone", str(tiny_unet_dir), "--text-encoder", str(tiny_encoder_dir), "--window", "32",
               "--head-dim", "16", "--epochs", "100000", "--cache-dir", str(tmp_path / "cache"),
               "--companion-steps", "3"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "cache").glob("*.safetensors"))) < 3:
        time.sleep(0.2)
    time.sleep(1.0)  # well into the epochs
    process.send_signal(signal.SIGKILL)
    process.wait()
    # the model's files are untouched; the stopped run's training state (for --resume) sits beside them
    left = {p.name: p.read_bytes() for p in published.iterdir() if not p.name.startswith(".")}
    left.pop("training-state.pt", None)
    assert left == before
    import torch

    torch.testing.assert_close(TextDiffModel.load(published, "cpu").predict_proba(image, "x"), expected)
