"""Clicks: maps, simulated corrections, checked inputs, a head that reads them, kept features for fast rounds."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from textdiff.cli import main
from textdiff.clicks import (
    MAX_CLICKS,
    Click,
    click_maps,
    correct_regions,
    corrective_click,
    parse_clicks,
    training_clicks,
)
from textdiff.data import read_image, read_lvit


def test_click_maps_are_disks_of_their_class_at_working_scale():
    maps = click_maps([Click(10, 20, 1), Click(0, 0, 0)], (40, 50), 2, radius=2)
    assert maps.shape == (2, 40, 50) and maps[1, 10, 20] == 1 and maps[1, 10, 23] == 0 and maps[1, 12, 20] == 1
    assert maps[0, 0, 0] == 1 and maps[0, 10, 20] == 0
    half = click_maps([Click(10, 20, 1)], (20, 25), 2, radius=1, scale=0.5)  # native (10, 20) -> working (4.75, 9.75)
    assert half[1, 5, 10] == 1 and half[1, 10, 20] == 0
    assert click_maps([], (4, 4), 3, radius=1).sum() == 0


def test_a_click_turns_the_region_the_model_doubts_as_much_as_the_clicked_pixel():
    lesion = torch.zeros(60, 60)
    lesion[5:25, 5:25] = 0.9  # a sure region
    lesion[25:35, 5:25] = 0.6  # its doubtful fringe, predicted too
    lesion[40:50, 40:50] = 0.4  # a missed region the model leans towards
    lesion[40:50, 52:56] = 0.2  # beside it, less lesion-like (touching: the region must stop at the threshold)
    lesion[40:50, 50:52] = 0.35
    probs = torch.stack([1 - lesion, lesion])
    label = (lesion > 0.5).numpy().astype(np.uint8)
    fringe_out = correct_regions(label, probs, [Click(30, 15, 0)], radius=2)  # background click on the fringe
    assert (fringe_out[25:35, 5:25] == 0).all() and (fringe_out[5:25, 5:25] == 1).all()  # the sure part stays
    grown = correct_regions(label, probs, [Click(45, 45, 1)], radius=2)  # foreground click in the missed region
    assert (grown[40:50, 40:50] == 1).all() and (grown[40:50, 50:] == 0).all() and grown.sum() == label.sum() + 100
    sure = correct_regions(label, probs, [Click(2, 58, 1)], radius=2)  # on background the model is sure of:
    assert sure.sum() - label.sum() == int((click_maps([Click(2, 58, 1)], (60, 60), 2, 2)[1] > 0).sum())  # a disk
    assert (correct_regions(label, probs, [Click(10, 10, 1)], radius=2) == label).all()  # already right
    clump = np.zeros((60, 60), np.uint8)
    clump[10:13, :] = 1  # a thin false strip joined to everything along it (nuclei in a clump)
    strip = torch.stack([torch.tensor(1.0 - clump), torch.tensor(clump * 0.8)])
    cut = correct_regions(clump, strip, [Click(11, 30, 0)], radius=2)  # depth 2: reach 8 pixels either side
    assert (cut[10:13, 23:38] == 0).all() and (cut[10:13, :20] == 1).all() and (cut[10:13, 40:] == 1).all()
    both = correct_regions(label, probs, [Click(30, 15, 0), Click(45, 45, 1)], radius=2)  # in turn
    assert (both[25:35, 5:25] == 0).all() and (both[40:50, 40:50] == 1).all()


def test_corrective_clicks_go_inside_the_largest_error_with_the_true_class():
    truth = np.zeros((30, 30), np.uint8)
    truth[5:20, 5:20] = 1  # missed entirely: the largest error
    prediction = np.zeros_like(truth)
    prediction[25:28, 25:28] = 1  # a small false positive
    click = corrective_click(prediction, truth)
    assert click.label == 1 and 10 <= click.y <= 14 and 10 <= click.x <= 14
    prediction[5:20, 5:20] = 1
    assert corrective_click(prediction, truth).label == 0  # now the false positive is what is left
    assert corrective_click(truth, truth) is None
    # training: none half of the time, else clicks that each fix a region
    target = torch.from_numpy(truth.astype(np.int64))[None].repeat(20, 1, 1)
    placed = training_clicks(torch.zeros_like(target), target, random.Random(0))
    assert any(not p for p in placed) and any(p for p in placed)
    assert all(c.label == 1 for p in placed for c in p)  # one error region: later clicks find nothing to fix
    assert all(len(p) <= 1 for p in placed)


def test_clicks_from_requests_and_files_are_checked():
    labels = {"background": 0, "nucleus": 1}
    assert parse_clicks([{"y": 1, "x": 2.5, "label": "nucleus"}, {"y": 0, "x": 0, "label": 0}], labels, (10, 10)) == \
        [Click(1.0, 2.5, 1), Click(0.0, 0.0, 0)]
    bad = [({"y": 10, "x": 0, "label": 1}, "outside"), ({"y": "a", "x": 0, "label": 1}, "finite numbers"),
           ({"y": float("nan"), "x": 0, "label": 1}, "finite numbers"), ({"y": True, "x": 0, "label": 1}, "finite"),
           ({"y": 0, "x": 0, "label": "tumour"}, "unknown label"), ({"y": 0, "x": 0, "label": 5}, "unknown label"),
           ({"y": 0, "x": 0}, "expected keys"), ({"y": 0, "x": 0, "label": 1, "z": 3}, "expected keys")]
    for item, reason in bad:
        with pytest.raises(ValueError, match=reason):
            parse_clicks([item], labels, (10, 10))
    with pytest.raises(ValueError, match="at most"):
        parse_clicks([{"y": 0, "x": 0, "label": 1}] * (MAX_CLICKS + 1), labels, (10, 10))
    with pytest.raises(ValueError, match="list"):
        parse_clicks({"y": 0}, labels, (10, 10))


@pytest.fixture()
def click_model(tiny_unet_dir, tiny_encoder_dir):
    from textdiff.model import ModelConfig, TextDiffModel

    config = ModelConfig(backbone=str(tiny_unet_dir), text_encoder=str(tiny_encoder_dir), window=32, tile=64,
                         head_dim=16, precision="fp32", clicks=True, click_radius=2)
    return TextDiffModel.build(config, "cpu", seed=0)


def test_a_click_model_trains_on_its_errors_and_answers_clicks_running_only_the_head(click_model, lvit_folder,
                                                                                     tmp_path, monkeypatch):
    from textdiff.evaluate import evaluate
    from textdiff.train import TrainConfig, train

    samples = read_lvit(lvit_folder)
    assert click_model.head.project[-1][0].in_channels == 3 + 2  # the image and one map per class
    train(click_model, samples, [], tmp_path / "m", TrainConfig(epochs=2), progress=False)
    image = read_image(samples[0].image)
    plain = click_model.predict_image_proba(image, samples[0].report)
    clicked = click_model.predict_image_proba(image, samples[0].report, clicks=[Click(40, 40, 1)])
    assert plain.shape == clicked.shape and not torch.allclose(plain, clicked)
    # kept features: a click round on an image seen before runs the head only
    calls = []
    forward = click_model.features.forward
    monkeypatch.setattr(click_model.features, "forward", lambda x: calls.append(1) or forward(x))
    click_model.keep_features(64)
    click_model.predict(image, samples[0].report)
    first = len(calls)
    again = click_model.predict_image_proba(image, samples[0].report, clicks=[Click(40, 40, 1)])
    assert first >= 1 and len(calls) == first and torch.allclose(again, clicked, atol=1e-5)
    click_model.keep_features(None)
    result = evaluate(click_model, samples, progress=False, clicks=[0, 1, 3])
    assert set(result["dice_by_clicks"]) == {0, 1, 3}
    assert result["dice_by_clicks"][0] == pytest.approx(np.mean([v["dice"] for v in result["per_image"].values()]),
                                                        abs=1e-3)
    assert click_model.memory is None  # evaluation's kept features are dropped after it


def test_a_model_without_clicks_takes_them_as_regions(tiny_model, lvit_folder):
    from textdiff.evaluate import evaluate

    samples = read_lvit(lvit_folder)
    image = read_image(samples[0].image)
    plain = tiny_model.predict(image, "x")
    clicked = tiny_model.predict(image, "x", clicks=[Click(1, 1, 1 - int(plain[1, 1]))])
    assert clicked[1, 1] != plain[1, 1] and (clicked != plain).sum() >= 1
    result = evaluate(tiny_model, samples, progress=False, clicks=[0, 1, 3])
    assert result["dice_by_clicks"][0] == pytest.approx(result["dice"], abs=1e-4)
    assert result["dice_by_clicks"][3] >= result["dice_by_clicks"][0]  # a click never leaves its pixel wrong


def test_cli_trains_with_clicks_replays_a_clicks_file_and_scores_click_counts(lvit_folder, tiny_unet_dir,
                                                                              tiny_encoder_dir, tmp_path, capsys):
    common = ["--backbone", str(tiny_unet_dir), "--text-encoder", str(tiny_encoder_dir), "--window", "32",
              "--companion-steps", "3"]
    model_dir = tmp_path / "model"
    assert main(["train", "--data", str(lvit_folder), "--out", str(model_dir), "--epochs", "1", "--head-dim", "16",
                 "--clicks", *common]) == 0
    assert json.loads((model_dir / "config.json").read_text())["clicks"] is True
    clicks = tmp_path / "clicks.json"
    clicks.write_text(json.dumps([{"y": 40, "x": 40, "label": "nucleus"}, {"y": 5, "x": 5, "label": 0}]))
    image = lvit_folder / "img" / "case_0.png"
    assert main(["infer", "--model", str(model_dir), "--image", str(image), "--out", str(tmp_path / "l.png"),
                 "--clicks", str(clicks)]) == 0
    clicks.write_text(json.dumps([{"y": 400, "x": 40, "label": "nucleus"}]))
    assert main(["infer", "--model", str(model_dir), "--image", str(image), "--out", str(tmp_path / "l.png"),
                 "--clicks", str(clicks)]) != 0
    assert "outside the 96x96 image" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(lvit_folder), "--model", str(model_dir), "--clicks", "0,2",
                 "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["dice_by_clicks"]) == {"0", "2"}
