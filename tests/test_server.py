"""A real `monailabel start_server` on a free loopback port, driven by MONAI Label's own client through the
sequence 3D Slicer runs: info -> infer with a report (.nrrd) -> save a .nii.gz label -> train (async) ->
infer with the new model (stored report) -> scoring -> next sample."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("monailabel")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, server=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server is not None and server.poll() is not None:
            raise AssertionError(f"server exited while waiting for {what}")
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_slicer_sequence_against_real_server(tmp_path, tiny_model, lvit_folder):
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelUtils

    from textdiff.studies import import_lvit

    tiny_model.save(tmp_path / "initial")
    studies = tmp_path / "studies"
    import_lvit(lvit_folder, studies, labels=1)
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    env = dict(os.environ, MONAI_LABEL_TRACKING_ENABLED="false", HF_HUB_OFFLINE="1")
    server = subprocess.Popen(
        [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(ROOT / "apps" / "textdiff"),
         "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
         "--conf", "model", str(tmp_path / "initial"), "--conf", "model_dir", str(tmp_path / "published"),
         "--conf", "epochs", "2"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    try:
        def ready():
            try:
                return client.info()
            except Exception:
                return None

        info = wait_for(ready, 180, "the server to answer /info/", server)
        assert "report" in info["models"]["textdiff"]["config"]

        label_file, result = client.infer("textdiff", "case_1", {"report": "dense nuclei", "result_extension": ".nrrd",
                                                                 "result_dtype": "uint8"})
        assert result["report_source"] == "request"
        assert sitk.ReadImage(label_file).GetSize()[:2] == (96, 96)

        slicer_label = np.zeros((1, 96, 96), np.uint8)
        slicer_label[0, 10:50, 10:50] = 1
        sitk.WriteImage(sitk.GetImageFromArray(slicer_label), str(tmp_path / "case_1.nii.gz"))
        client.save_label("case_1", str(tmp_path / "case_1.nii.gz"), tag="final")

        client.train_start("textdiff", {"max_epochs": 2})
        # infers keep answering while the training subprocess runs; they serve the old model until the publish
        during = [client.infer("textdiff", "case_2", {"report": "x"})[1]["model"] for _ in range(3)]
        assert all("initial" in m or "published" in m for m in during)

        def trained():
            status = client.train_status()
            if status.get("status") == "FAILED":
                raise AssertionError(f"training failed: {status}")
            return status.get("status") == "DONE"

        wait_for(trained, 300, "training to finish", server)
        assert (tmp_path / "published" / "config.json").is_file()

        _, result = client.infer("textdiff", "case_2", {"result_extension": ".nrrd"})
        assert result["report_source"] == "datastore" and "published" in result["model"]

        def scored():  # the server also scores by itself after training: 429 until that run is over
            status, body, _, _ = MONAILabelUtils.http_method("POST", url, "/scoring/textdiff_uncertainty?run_sync=true")
            assert status in (200, 429), body
            return status == 200

        wait_for(scored, 120, "scoring", server)
        sample = client.next_sample("textdiff_uncertainty", {})
        assert sample["id"] == "case_2"  # the only unlabeled image left
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        if server.returncode not in (0, -15, None):
            print((tmp_path / "server.log").read_text()[-5000:])


@pytest.mark.slow
def test_hostile_probe_suite_gets_nothing_through(tmp_path, tiny_model):
    """scripts/hostile_probe.py against a real server serving a tiny model: every probe refused, RSS flat over
    distinct reports, /info/ answered during a long inference."""
    tiny_model.save(tmp_path / "tiny")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "hostile_probe.py"), "--model", str(tmp_path / "tiny"),
                             "--reports", "300", "--long-side", "1200"], capture_output=True, text=True, timeout=900,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "GOT THROUGH" not in result.stdout and "0 failed" in result.stdout
