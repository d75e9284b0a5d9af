"""A client that does not play by the rules: every probe gets a clear 4xx and nothing is written outside the studies
folder, no label is overwritten, no server file is read, no foreign web page is let in."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage

from support import APP_DIR, infer_json


def png_bytes(shape=(96, 96, 3), value=128) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(np.full(shape, value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def put_image(client, query: str, name="upload.png", payload=None):
    return client.put(f"/datastore/image?{query}", files={"file": (name, payload or png_bytes())})


def assert_4xx(response, *words, status=400):
    assert response.status_code == status, (response.status_code, response.text[:300])
    detail = response.json()["detail"]
    assert all(word in detail for word in words), detail


def uploads_left():
    from lib.server_guards import uploads_dir

    return sorted(os.listdir(uploads_dir()))


def test_image_ids_and_upload_names_cannot_leave_the_studies_folder(client, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    assert_4xx(put_image(client, f"image={outside}/planted"), "image id")
    assert_4xx(put_image(client, "image=../escaped"), "image id")
    assert_4xx(put_image(client, "image=..", name="x.png"), "image id")
    assert_4xx(put_image(client, "image=ok", name="payload.sh"), "must end with")
    assert list(outside.iterdir()) == []
    assert not (client.studies.parent / "escaped.png").exists()
    # a name taken from the upload keeps only its base name
    response = put_image(client, "", name="../../from_name.png")
    assert response.status_code == 200 and response.json()["image"] == "from_name", response.text
    assert (client.studies / "from_name.png").is_file() and not (client.studies.parent.parent / "from_name.png").exists()
    assert uploads_left() == []


def test_uploads_are_decoded_before_they_are_stored_and_never_replace_an_image(client):
    assert_4xx(put_image(client, "image=notpng", payload=b"#!/bin/sh\nrm -rf /\n"), "cannot use this image")
    assert not (client.studies / "notpng.png").exists()
    before = (client.studies / "case_1.png").read_bytes()
    assert_4xx(put_image(client, "image=case_1"), "exists already", status=409)
    assert (client.studies / "case_1.png").read_bytes() == before
    assert uploads_left() == []  # refused uploads leave nothing behind


def test_label_tags_and_ids_are_checked(client, tmp_path):
    label = png_bytes((96, 96), 0)
    target = tmp_path / "tagged"
    for query, word in ((f"image=case_1&tag={target}", "label tag"), ("image=case_1&tag=../../x", "label tag"),
                        ("image=../case_1&tag=final", "image id")):
        assert_4xx(client.put(f"/datastore/label?{query}", files={"label": ("l.png", label)}), word)
    assert not target.exists() and not (client.studies.parent / "x").exists()
    assert_4xx(client.delete("/datastore/label?id=case_0&tag=../../labels"), "label tag")
    assert_4xx(client.delete(f"/datastore/image?id={client.studies}/case_1"), "image id")
    assert (client.studies / "case_1.png").is_file()
    assert_4xx(client.put("/datastore/image/info?image=../case_1", data={"info": "{}"}), "image id")
    assert uploads_left() == []


def test_inference_never_writes_a_label_nor_reads_a_server_file(client, tmp_path):
    final = client.studies / "labels" / "final" / "case_0.png"
    before = final.read_bytes()
    for params, word in (({"save_label": True, "label_tag": "final"}, "label_tag, save_label"),
                         ({"image": str(client.studies / "case_1.png")}, "image"),
                         ({"image_path": "/etc/hostname"}, "image_path"), ({"device": "cuda:7"}, "device")):
        response = client.post("/infer/textdiff?image=case_0&output=json", data={"params": json.dumps(params)})
        assert_4xx(response, word)
    assert final.read_bytes() == before
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    assert_4xx(client.post(f"/infer/textdiff?image={secret}&output=json"), "image id")
    assert_4xx(client.post("/infer/textdiff?image=case_0&session_id=abc&output=json"), "sessions")
    # what a client may still send is honoured
    assert infer_json(client, "case_1", report="x", result_extension=".nrrd")["report_source"] == "request"


def test_batch_inference_cannot_target_the_annotators_labels(client):
    from monailabel.interfaces.utils.app import app_instance

    with pytest.raises(Exception, match="never writes"):
        app_instance().infer({"model": "textdiff", "image": "case_0", "save_label": True, "label_tag": "final"})


def test_routes_this_app_does_not_offer_are_refused(client):
    assert client.put("/model/textdiff", files={"file": ("m.pt", b"x")}).status_code == 403
    assert client.put("/session/", files={"files": ("a.png", png_bytes())}).status_code == 403
    assert client.post("/infer/wsi/textdiff", json={}).status_code == 403


def test_cross_origin_pages_are_refused_unless_listed(client, tmp_path, monkeypatch):
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"}
    response = client.options("/datastore/image", headers=preflight)
    assert response.status_code == 400 and "access-control-allow-origin" not in response.headers
    simple = client.get("/info/", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers

    from monailabel.app import app

    from lib import server_guards
    from lib.settings import AppSettings

    server_guards.set_cors(app, AppSettings.from_conf({"cors_origins": "https://viewer.example"}, tmp_path).cors_origins)
    allowed = client.options("/datastore/image", headers=dict(preflight, Origin="https://viewer.example"))
    assert allowed.headers["access-control-allow-origin"] == "https://viewer.example"
    assert "access-control-allow-credentials" not in allowed.headers
    assert client.options("/datastore/image", headers=preflight).status_code == 400
    with pytest.raises(ValueError, match="wildcard"):
        AppSettings.from_conf({"cors_origins": "*"}, tmp_path)


@pytest.mark.parametrize("options, word", [({"learning_rate": "nan"}, "learning_rate"),
                                           ({"learning_rate": 1e9}, "learning_rate"),
                                           ({"max_epochs": 10**9}, "max_epochs"), ({"max_epochs": 2.5}, "max_epochs"),
                                           ({"seed": "inf"}, "seed"), ({"max_epochs": True}, "max_epochs")])
def test_training_options_are_finite_and_bounded(client, options, word):
    published = client.tmp / "published" / "config.json"
    assert_4xx(client.post("/train/textdiff?run_sync=true", json=options), word)
    assert not published.exists()


@pytest.mark.parametrize("options, word", [({"minutes": "nan"}, "minutes"), ({"max_steps": 1e12}, "max_steps"),
                                           ({"crop_size": 100000}, "crop_size"), ({"scale": "-inf"}, "scale")])
def test_pretraining_options_are_finite_and_bounded(client, options, word):
    assert_4xx(client.post("/train/textdiff_pretrain?run_sync=true", json=options), word)


def test_work_cap_counts_tiles_slices_and_variants(client, tmp_path):
    thin = io.BytesIO()
    PILImage.fromarray(np.zeros((1, 200_000), np.uint8)).save(thin, format="PNG")
    response = client.post("/infer/textdiff?output=json", files={"file": ("thin.png", thin.getvalue())},
                           data={"params": "{}"})
    assert_4xx(response, "backbone windows", "max_infer_windows")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20_000, 1, 1), np.uint8)), str(tmp_path / "slices.nrrd"))
    response = client.post("/infer/textdiff?output=json", files={"file": ("s.nrrd", (tmp_path / "slices.nrrd").read_bytes())},
                           data={"params": "{}"})
    assert_4xx(response, "backbone windows")
    assert uploads_left() == []


def test_work_windows_counts_what_inference_runs(tiny_model):
    from textdiff.data import Image

    def windows(shape, volume=False):
        return tiny_model.work_windows(Image(np.zeros(shape, np.float32), None, volume))

    tile = tiny_model.config.tile
    assert windows((tile, tile, 3)) == 1
    assert windows((tile, 4 * tile, 3)) == 4
    assert windows((1, 100 * tile, 1)) == 100  # one row: padded to a tile 100 times over
    assert windows((5, tile, tile), volume=True) == 5
    tiny_model.use_test_time_variants(4)
    assert windows((tile, tile, 3)) == 4


def test_info_answers_while_a_long_inference_runs(client, monkeypatch):
    from textdiff.model import TextDiffModel

    real_predict = TextDiffModel.predict
    started = threading.Event()

    def slow_predict(self, *args, **kwargs):
        started.set()
        time.sleep(6)
        return real_predict(self, *args, **kwargs)

    monkeypatch.setattr(TextDiffModel, "predict", slow_predict)
    worker = threading.Thread(target=lambda: client.post("/infer/textdiff?image=case_1&output=json"))
    worker.start()
    assert started.wait(30)
    began = time.time()
    assert client.get("/info/").status_code == 200
    latency = time.time() - began
    worker.join()
    assert latency < 2.0, latency


def test_non_finite_heads_are_never_saved(tiny_model, tmp_path):
    import torch

    tiny_model.save(tmp_path / "model")
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    config = (tmp_path / "model" / "config.json").read_text()
    with torch.no_grad():
        next(tiny_model.head.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        tiny_model.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before
    assert (tmp_path / "model" / "config.json").read_text() == config


def test_backbone_versions_are_published_whole_and_heads_pin_them(tmp_path, tiny_unet_dir, tiny_encoder_dir):
    import shutil

    from textdiff.model import ModelConfig, TextDiffModel
    from textdiff.pretrain import publish_backbone, published_backbones

    work = tmp_path / "work"
    shutil.copytree(tiny_unet_dir, work)
    (work / "recipe.json").write_text('{"step": 1}')
    first = publish_backbone(work, tmp_path / "versions")
    (work / "recipe.json").write_text('{"step": 2}')
    second = publish_backbone(work, tmp_path / "versions")
    assert [p.name for p in published_backbones(tmp_path / "versions")] == ["0001", "0002"] == [first.name, second.name]
    assert json.loads((first / "recipe.json").read_text()) == {"step": 1}
    (work / "recipe.json").unlink()
    with pytest.raises(FileNotFoundError):
        publish_backbone(work, tmp_path / "versions")
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == ["0001", "0002"]  # no staging left

    config = ModelConfig(backbone=str(first), text_encoder=str(tiny_encoder_dir), window=32, tile=64, head_dim=16,
                         precision="fp32")
    TextDiffModel.build(config, "cpu").save(tmp_path / "head")
    TextDiffModel.load(tmp_path / "head", "cpu")
    from support import tiny_unet_model

    tiny_unet_model(seed=5).save_pretrained(first)  # the folder's weights change under the head: refused, not served
    with pytest.raises(ValueError, match="not the one this head was trained on"):
        TextDiffModel.load(tmp_path / "head", "cpu")


def test_info_survives_a_half_written_pretraining(client):
    from monailabel.interfaces.utils.app import app_instance

    pretrainer = app_instance().task.pretrainer()
    pretrainer.work.mkdir(parents=True)
    (pretrainer.work / "recipe.json").write_text('{"step": 3, "wal')  # mid-write
    assert client.get("/info/").status_code == 200


def test_datastore_index_is_replaced_atomically(client, monkeypatch):
    from monailabel.interfaces.utils.app import app_instance

    index = client.studies / "datastore_v2.json"
    before = index.read_text()
    store = app_instance().datastore()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        store.update_image_info("case_1", {"report": "new"})
    assert index.read_text() == before
    assert not [p for p in client.studies.iterdir() if p.name.startswith(".datastore.")]


def test_a_named_network_address_without_authentication_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(APP_DIR))
    from lib.security import bound_host, exposure

    assert bound_host(["monailabel", "start_server", "--app", "a"]) == ("0.0.0.0", False)  # MONAI Label's default
    assert bound_host(["monailabel", "start_server", "--host", "127.0.0.1"]) == ("127.0.0.1", True)
    assert bound_host(["python", "-m", "monailabel.interfaces.utils.app"]) is None  # train/scoring subprocess
    for host in ("127.0.0.1", "::1", "localhost"):
        assert exposure((host, True), auth_enabled=False, allow_remote=False) == "open"
    with pytest.raises(RuntimeError, match="--host 127.0.0.1"):
        exposure(("0.0.0.0", True), auth_enabled=False, allow_remote=False)
    with pytest.raises(RuntimeError, match="refusing to serve on 192.168.1.5"):
        exposure(("192.168.1.5", True), auth_enabled=False, allow_remote=False)
    assert exposure(("0.0.0.0", True), auth_enabled=True, allow_remote=False) == "open"
    assert exposure(("0.0.0.0", True), auth_enabled=False, allow_remote=True) == "open"
    assert exposure(("0.0.0.0", False), auth_enabled=False, allow_remote=False) == "loopback-clients"

    # the app itself refuses, before anything is served
    import importlib.util

    monkeypatch.setattr(sys, "argv", ["monailabel", "start_server", "--host", "0.0.0.0"])
    spec = importlib.util.spec_from_file_location("textdiff_app_main", APP_DIR / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    (tmp_path / "studies").mkdir()
    with pytest.raises(RuntimeError, match="refusing to serve on 0.0.0.0"):
        main.TextDiffApp(str(APP_DIR), str(tmp_path / "studies"), {})


def test_the_default_wide_bind_serves_this_machine_only(client):
    """`monailabel start_server` without --host binds 0.0.0.0: the app then answers loopback clients only."""
    from monailabel.app import app

    from lib import server_guards
    from lib.settings import AppSettings

    assert client.get("/info/").status_code == 200
    server_guards.install(app, AppSettings.from_conf({}, client.tmp), loopback_clients_only=True)
    refused = client.get("/info/")  # the test client's address is "testclient", not a loopback address
    assert refused.status_code == 403 and "allow_remote" in refused.json()["detail"]
    assert client.put("/datastore/image?image=x", files={"file": ("x.png", png_bytes())}).status_code == 403
    assert not (client.studies / "x.png").exists()
    server_guards.install(app, AppSettings.from_conf({}, client.tmp))  # as the next app built in this process
    assert client.get("/info/").status_code == 200


def test_report_embeddings_are_bounded(tiny_model, monkeypatch):
    import textdiff.text

    monkeypatch.setattr(textdiff.text, "CACHE_REPORTS", 8)
    encoder = tiny_model.encoder
    for i in range(50):
        encoder.embed(f"report number {i}")
    assert len(encoder._cache) == 8
    assert "report number 49" in encoder._cache and "report number 0" not in encoder._cache


def test_server_process_keeps_glibcs_heap_defaults(tiny_model, tmp_path):
    """Building and running a model (what the server does) leaves malloc's thresholds alone: a 64 MB block is still
    a fresh mmap. The CLI tunes them for its own process."""
    tiny_model.save(tmp_path / "model")
    code = f"""
import ctypes, numpy as np, torch
from textdiff.accel import heap
from textdiff.data import Image
from textdiff.model import TextDiffModel
libc = heap._libc()
if libc is None or not hasattr(libc, "mallinfo2"):
    print("skip"); raise SystemExit
class M(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = M
TextDiffModel.load({str(tmp_path / 'model')!r}, "cpu").predict(Image(np.zeros((64, 64, 3), np.uint8), None, False), "x")
before = libc.mallinfo2().hblkhd
block = torch.empty(64 << 20, dtype=torch.uint8)
print("mmapped" if libc.mallinfo2().hblkhd - before >= 64 << 20 else "heap")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if out.stdout.strip() == "skip":
        pytest.skip("not glibc >= 2.33")
    assert out.stdout.strip().splitlines()[-1] == "mmapped", out.stderr[-2000:]


def test_datastore_refuses_bad_ids_and_tags_below_the_routes(client, tmp_path):
    """The checks hold for every caller of the datastore, not only for the HTTP routes that check first."""
    from fastapi import HTTPException
    from monailabel.interfaces.utils.app import app_instance

    store = app_instance().datastore()
    image = tmp_path / "upload.png"
    image.write_bytes(png_bytes())
    label = tmp_path / "label.png"
    label.write_bytes(png_bytes((96, 96), 0))
    for call in (lambda: store.add_image(f"{tmp_path}/planted", str(image), {}),
                 lambda: store.add_image(".hidden", str(image), {}), lambda: store.add_image("a;b", str(image), {}),
                 lambda: store.add_image("../escaped", str(image), {}),
                 lambda: store.save_label("case_1", str(label), str(tmp_path / "tagged"), {}),
                 lambda: store.save_label("case_1", str(label), "../final", {}),
                 lambda: store.remove_label("case_0", "../../x"),
                 lambda: store.update_image_info("../case_1", {}),
                 lambda: store.update_images_info({"case_1": {"planted": 1}, "../case_2": {}}),
                 lambda: store.update_images_info({"case_1": {"planted": 1}, "nonexistent": {}}),
                 lambda: store.update_images_info({"case_1": ["not", "a", "dict"]})):
        with pytest.raises(HTTPException) as refused:
            call()
        assert refused.value.status_code == 400
    assert "planted" not in store.get_image_info("case_1")  # a refused bulk update changes no image
    assert not (tmp_path / "planted.png").exists() and not (tmp_path / "tagged").exists()
    assert not (client.studies.parent / "escaped.png").exists()
    assert not (client.studies / ".hidden.png").exists() and not (client.studies / "a;b.png").exists()


def test_a_link_inside_the_studies_folder_does_not_lead_out_of_it(client, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (client.studies / "labels" / "linked").symlink_to(outside, target_is_directory=True)
    response = client.put("/datastore/label?image=case_1&tag=linked", files={"label": ("l.png", png_bytes((96, 96), 0))})
    assert_4xx(response, "outside the studies folder")
    assert list(outside.iterdir()) == []


@pytest.mark.skipif(sys.platform != "linux", reason="address-space limits are Linux's")
def test_kernel_scratch_allocation_failure_is_an_error_not_a_crash():
    from textdiff.accel import kernels as fused

    if fused.library() is None:
        pytest.skip("CPU kernel not built here")
    code = """
import ctypes, resource, torch
from textdiff.accel import kernels as fused
lib = fused.library()
channels = 1 << 24  # each thread's scratch: 2 x 16 M doubles = 256 MB
out = torch.empty(2 * channels, dtype=torch.float64)
x = torch.zeros(channels, dtype=torch.bfloat16)  # one pixel of every channel
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (64 << 20), hard))
status = lib.textdiff_gn_moments(2, 0, x.data_ptr(), 1, 1, channels, out.data_ptr())
print("status", status)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "status -1"
