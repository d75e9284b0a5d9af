"""Background work gives way to requests: the gate, the engine's yield points, and the app holding the gate."""
import os
import threading
import time

import numpy as np
import pytest
import torch

from textdiff import priority
from textdiff.data import Image
from textdiff.priority import RequestGate
from textdiff.train import TrainConfig, train

PLANE = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)


@pytest.fixture()
def hook():
    yield
    priority.set_yield(None)


def test_gate_waits_while_a_request_holds_it_and_lingers_after_it(tmp_path):
    gate = RequestGate(tmp_path / "requests", linger_s=0.3, stale_s=5, max_wait_s=10, poll_s=0.01)
    assert not gate.busy() and gate.wait() < 0.05
    ended = []

    def request():
        with gate.held():
            time.sleep(0.4)
        ended.append(time.monotonic())

    worker = threading.Thread(target=request)
    worker.start()
    time.sleep(0.1)
    assert gate.busy()
    waited = gate.wait()
    resumed = time.monotonic()
    worker.join()
    assert ended and 0.25 <= resumed - ended[0] < 1.5 and 0.5 < waited < 3  # the request, then the linger
    assert [p.name for p in (tmp_path / "requests").iterdir()] == [RequestGate.LAST]  # no marker left
    time.sleep(0.3)
    assert not gate.busy()
    stale = tmp_path / "requests" / "1-dead.request"  # left by a killed server
    stale.touch()
    os.utime(stale, (time.time() - 60, time.time() - 60))
    assert not gate.busy()
    impatient = RequestGate(tmp_path / "requests", max_wait_s=0.2, poll_s=0.01)
    with impatient.held():
        assert 0.2 <= impatient.wait() < 1  # background work is postponed, not starved


def test_inference_and_training_pass_a_yield_point_per_backbone_batch_and_step(tiny_model, tmp_path, hook,
                                                                               lvit_folder):
    from textdiff.data import read_lvit

    alone = tiny_model.predict_proba(PLANE, "nuclei")
    calls = []
    priority.set_yield(lambda: calls.append(1))
    torch.testing.assert_close(tiny_model.predict_proba(PLANE, "nuclei"), alone)
    assert tiny_model.work_windows(Image(PLANE, None, False)) == 1
    assert len(calls) >= 3  # one backbone forward: pause points between the UNet's blocks, not only between forwards
    calls.clear()
    config = TrainConfig(epochs=1, batch_size=1, cache_dir=str(tmp_path / "cache"))  # a step per window
    samples = read_lvit(lvit_folder)[:1]
    summary = train(tiny_model, samples, [], tmp_path / "out", config, progress=False)
    assert len(calls) >= summary["windows"] + 1  # the extraction's blocks and every step


def test_a_background_prediction_pauses_while_a_request_holds_the_gate(tiny_model, tmp_path, hook):
    gate = RequestGate(tmp_path / "requests", linger_s=0, poll_s=0.01)
    priority.set_yield(gate.wait)
    done = threading.Event()
    with gate.held():
        background = threading.Thread(target=lambda: (tiny_model.predict_proba(PLANE), done.set()))
        background.start()
        time.sleep(0.5)
        assert not done.is_set()  # still waiting at its first backbone batch
    background.join(30)
    assert done.is_set()


def test_the_server_holds_the_gate_during_an_inference(client, monkeypatch):
    from textdiff.model import TextDiffModel

    gate = RequestGate(client.tmp / "requests", linger_s=0)  # the app's: beside its model_dir
    seen = []
    predict = TextDiffModel.predict

    def recording(self, *args, **kwargs):
        seen.append(gate.busy())
        return predict(self, *args, **kwargs)

    monkeypatch.setattr(TextDiffModel, "predict", recording)
    assert client.post("/infer/textdiff?image=case_1&output=json").status_code == 200
    assert seen == [True] and not gate.busy()
