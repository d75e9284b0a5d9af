"""The MONAI Label app through FastAPI's TestClient, with tiny models: Slicer's sequence, label checks, 3D."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from support import APP_DIR, SHARED, infer_json, infer_label, put_label

pytest.importorskip("monailabel")


def test_info_lists_model_trainer_scoring_and_strategies(client):
    info = client.get("/info/").json()
    model = info["models"]["textdiff"]
    assert model["type"] == "segmentation" and "report" in model["config"]
    assert "textdiff" in info["trainers"]
    assert {"textdiff_uncertainty", "textdiff_diverse", "random", "first"} <= set(info["strategies"])
    assert next(iter(info["strategies"])) == "random"  # Slicer's default: the campaigns' best (docs/campaigns.md)
    assert "textdiff_uncertainty" in info["scoring"]


def test_infer_uses_request_then_stored_report_then_none(client):
    assert infer_json(client, "case_1", report="dense nuclei")["report_source"] == "request"
    stored = infer_json(client, "case_1")
    assert stored["report_source"] == "datastore" and stored["report"]
    client.put("/datastore/image/info?image=case_2", data={"info": json.dumps({"report": ""})})
    none = infer_json(client, "case_2")
    assert none["report_source"] == "none" and none["text_used"] is False and "without text" in none["note"]


def test_infer_returns_label_of_image_size_in_slicer_format(client):
    label = infer_label(client, "case_1", report="dense nuclei", result_extension=".nrrd", result_dtype="uint8")
    assert label.GetSize()[:2] == (96, 96)
    assert set(np.unique(sitk.GetArrayFromImage(label))) <= {0, 1}
    png = infer_label(client, "case_1")
    assert png.GetSize() == (96, 96)


def test_labels_checked_at_save_time(client):
    label_file = client.studies / "labels" / "final" / "case_0.png"
    before = label_file.read_bytes()
    wrong_size = put_label(client, "case_0", np.zeros((1, 50, 60), np.uint8))
    assert wrong_size.status_code == 400 and "size" in wrong_size.json()["detail"]
    bad_values = np.zeros((1, 96, 96), np.uint8)
    bad_values[0, 0, 0] = 7
    assert put_label(client, "case_0", bad_values).status_code == 400
    assert put_label(client, "case_0", np.full((1, 96, 96), 0.5, np.float32)).status_code == 400
    assert label_file.read_bytes() == before


def test_slicer_label_then_train_then_infer_with_new_model(client):
    slicer = np.zeros((1, 96, 96), np.uint8)  # Slicer's .nii.gz: a trailing size-1 dimension
    slicer[0, 20:60, 30:70] = 1
    assert put_label(client, "case_1", slicer).status_code == 200
    before = infer_json(client, "case_2", report="x")["model"]
    response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 2})
    assert response.status_code == 200, response.text
    assert (client.tmp / "published" / "config.json").is_file()
    after = infer_json(client, "case_2")
    assert after["model"] != before and str(client.tmp / "published") in after["model"]
    assert client.get("/info/").json()["train_stats"]["textdiff"]["train_images"] == 2


def test_two_structures_one_round_of_the_loop_over_http(two_class_client):
    """Next sample -> a two-class label -> train -> rescore -> next sample, as Slicer drives it."""
    client = two_class_client
    assert client.get("/info/").json()["models"]["textdiff"]["labels"] == {"cell": 1, "edge": 2}
    chosen = client.post("/activelearning/textdiff_uncertainty", json={}).json()["id"]
    assert chosen in ("case_1", "case_2")
    label = np.zeros((1, 96, 96), np.uint8)
    label[0, 10:40, 10:40], label[0, 50:80, 50:80] = 1, 2
    too_many = label.copy()
    too_many[0, 0, 0] = 3  # a third structure the app does not annotate
    refused = put_label(client, chosen, too_many)
    assert refused.status_code == 400 and "0..2" in refused.json()["detail"]
    assert put_label(client, chosen, label).status_code == 200
    response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1})
    assert response.status_code == 200, response.text
    published = json.loads((client.tmp / "published" / "config.json").read_text())
    assert published["labels"] == {"background": 0, "cell": 1, "edge": 2}
    scored = client.post("/scoring/textdiff_uncertainty?run_sync=true")
    assert scored.status_code == 200
    following = client.post("/activelearning/textdiff_uncertainty", json={}).json()["id"]
    assert following not in (chosen, "case_0")  # labeled images are not served again
    assert set(np.unique(sitk.GetArrayFromImage(infer_label(client, following, report="x")))) <= {0, 1, 2}


def test_scoring_is_incremental_and_strategy_picks_most_uncertain(client):
    first = client.post("/scoring/textdiff_uncertainty?run_sync=true").json()
    assert client.post("/scoring/textdiff_uncertainty?run_sync=true").status_code == 200
    from monailabel.interfaces.utils.app import app_instance

    datastore = app_instance().datastore()
    scores = {i: datastore.get_image_info(i)["textdiff_uncertainty"] for i in ("case_1", "case_2")}
    sample = client.post("/activelearning/textdiff_uncertainty", json={}).json()
    assert sample["id"] == max(scores, key=scores.get)
    assert client.post("/activelearning/first", json={}).json()["id"] == "case_1"
    assert first is not None
    # scoring also places each image in frozen-feature space (a short projection kept in the index)
    from lib.activelearning.uncertainty import FEATURE_DIMS, FEATURES_KEY

    assert all(len(datastore.get_image_info(i)[FEATURES_KEY]) == FEATURE_DIMS for i in ("case_1", "case_2"))
    # the diverse strategy passes over an uncertain image that looks like a labeled one
    near, far = [1.0] + [0.0] * (FEATURE_DIMS - 1), [0.0] * (FEATURE_DIMS - 1) + [1.0]
    for image_id, info in (("case_0", {FEATURES_KEY: near}),
                           ("case_1", {FEATURES_KEY: near, "textdiff_uncertainty": 0.9}),
                           ("case_2", {FEATURES_KEY: far, "textdiff_uncertainty": 0.5})):
        datastore.update_image_info(image_id, info)
    assert client.post("/activelearning/textdiff_uncertainty", json={}).json()["id"] == "case_1"
    assert client.post("/activelearning/textdiff_diverse", json={}).json()["id"] == "case_2"


def test_volume_infer_keeps_geometry(client):
    if not (SHARED / "volumes").is_dir():
        pytest.skip("../shared/data/volumes not found")
    source = SHARED / "volumes" / "brain-mr" / "brain1_image.nrrd"
    shutil.copy(source, client.studies / "brain1.nrrd")
    from monailabel.interfaces.utils.app import app_instance

    app_instance().datastore().refresh()
    label = infer_label(client, "brain1", result_extension=".nii.gz")
    reference = sitk.ReadImage(str(source))
    assert label.GetSize() == reference.GetSize()
    assert np.allclose(label.GetSpacing(), reference.GetSpacing())
    assert np.allclose(label.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    assert np.allclose(label.GetDirection(), reference.GetDirection(), atol=1e-6)


def test_pretrain_trainer_adapts_backbone_used_by_next_head(client):
    refused = client.post("/train/textdiff_pretrain?run_sync=true", json={"start_from": "imagenet", "max_steps": 1})
    assert refused.status_code == 400 and "start_from" in refused.text, (refused.status_code, refused.text)
    for bad in ({"max_steps": "lots"}, {"minutes": -1}):
        refused = client.post("/train/textdiff_pretrain?run_sync=true", json=bad)
        assert refused.status_code == 400 and next(iter(bad)) in refused.text, (refused.status_code, refused.text)
    refused = client.post("/train/textdiff?run_sync=true", json={"max_epochs": "ten"})
    assert refused.status_code == 400 and "max_epochs" in refused.text, (refused.status_code, refused.text)
    response = client.post("/train/textdiff_pretrain?run_sync=true", json={"max_steps": 2, "crop_size": 32})
    assert response.status_code == 200, response.text
    from monailabel.interfaces.utils.app import app_instance

    adapted = app_instance().task.pretrainer().latest()
    assert adapted.name == "0001"
    assert (adapted / "config.json").is_file() and (adapted / "recipe.json").is_file()
    # it adapted the served model's backbone (the tiny test UNet), not a new default-sized one
    served = json.loads((client.tmp / "initial" / "config.json").read_text())["backbone"]
    assert json.loads((adapted / "config.json").read_text())["block_out_channels"] == \
        json.loads((Path(served) / "config.json").read_text())["block_out_channels"]
    assert "init_digest" in json.loads((adapted / "recipe.json").read_text())
    assert client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1}).status_code == 200
    published = json.loads((client.tmp / "published" / "config.json").read_text())
    assert published["backbone"] == str(adapted)
    assert infer_json(client, "case_1", report="x")["report_source"] == "request"



def test_test_time_variants_setting_reaches_the_served_model(tiny_model, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(APP_DIR))
    from lib.model_store import ModelStore
    from lib.settings import AppSettings

    with pytest.raises(ValueError, match="test_time_variants '9': test-time variants must be in 1..8"):
        AppSettings.from_conf({"test_time_variants": "9"}, tmp_path)
    tiny_model.save(tmp_path / "initial")
    settings = AppSettings.from_conf({"model": str(tmp_path / "initial"), "test_time_variants": "4"}, tmp_path)
    assert ModelStore(settings).current().config.test_time_variants == 4
    assert ModelStore(settings.replace(test_time_variants=None)).current().config.test_time_variants == 1


def test_the_feature_cache_setting_bounds_the_disk_of_training_and_scoring(tiny_model, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(APP_DIR))
    from lib.activelearning.uncertainty import EntropyScoring
    from lib.settings import AppSettings
    from lib.trainers.textdiff import TextDiffTrain

    with pytest.raises(ValueError, match="feature_cache_gb must be in"):
        AppSettings.from_conf({"feature_cache_gb": "0"}, tmp_path)
    settings = AppSettings.from_conf({"feature_cache_gb": "0.5"}, tmp_path)
    assert EntropyScoring(None, settings)._feature_cache(tiny_model).max_bytes == 2**29
    assert TextDiffTrain(None, settings, lambda: None).train_config({}).cache_max_gb == 0.5


def test_heads_trained_in_the_app_follow_the_initial_models_recipe(tiny_unet_dir, tiny_encoder_dir, tmp_path,
                                                                    monkeypatch):
    """New heads use the initial model's backbone and recipe, unless --conf names others."""
    import warnings

    monkeypatch.syspath_prepend(str(APP_DIR))
    from lib.model_store import ModelStore
    from lib.settings import AppSettings
    from lib.trainers.textdiff import TextDiffTrain
    from support import tiny_unet_model
    from textdiff.model import ModelConfig, TextDiffModel

    config = ModelConfig(backbone=str(tiny_unet_dir), text_encoder=str(tiny_encoder_dir), window=32, tile=64,
                         head_dim=16, precision="fp32")
    TextDiffModel.build(config, "cpu").save(tmp_path / "initial")
    tiny_unet_model(1).save_pretrained(tmp_path / "other")

    def new_head(**conf):
        settings = AppSettings.from_conf({"model": str(tmp_path / "initial"), **conf}, tmp_path)
        trainer = TextDiffTrain(ModelStore(settings), settings, lambda: None)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            return ModelStore(settings).current(), TextDiffModel.build(trainer.new_model_config(), "cpu")

    served, head = new_head()
    assert served.config.backbone == head.config.backbone == str(tiny_unet_dir)
    assert head.features.fingerprint() == served.features.fingerprint()
    served, head = new_head(backbone=str(tmp_path / "other"))
    assert head.config.backbone == str(tmp_path / "other")
    assert head.features.fingerprint() != served.features.fingerprint()
    # the head's recipe follows the initial model unless --conf says otherwise
    assert not served.config.subpixel and not head.config.subpixel and not head.head.subpixel
    served, head = new_head(subpixel="true", scale="0.25")
    assert head.config.subpixel and head.head.subpixel and head.config.scale == 0.25
    assert not served.config.subpixel and served.config.scale != 0.25
    with pytest.raises(ValueError, match="subpixel 'maybe': expected true/false"):
        new_head(subpixel="maybe")
    # a companion U-Net beside new heads: switched on (the engine's widths), and off again for a recipe that has one
    assert served.config.companion is None and head.companion is None
    served, head = new_head(companion="true")
    assert head.config.companion == [16, 32, 64, 128, 256] and head.companion is not None
    assert new_head(recipe="monuseg")[1].config.companion == [16, 32, 64, 128, 256]
    assert new_head(recipe="monuseg", companion="false")[1].companion is None
    # a recipe asked for shapes the head and its training; the app's labels stay, and --conf still overrides
    recipe = tmp_path / "mine.toml"
    recipe.write_text('[model]\nscale = 0.5\nhead_dim = 8\nlabels = ["other"]\n[train]\ntrain_steps = 7\n')
    served, head = new_head(recipe=str(recipe))
    assert head.config.scale == 0.5 and head.config.head_dim == 8 and head.config.labels == served.config.labels
    settings = AppSettings.from_conf({"model": str(tmp_path / "initial"), "recipe": str(recipe)}, tmp_path)
    assert TextDiffTrain(ModelStore(settings), settings, lambda: None).train_config({}).train_steps == 7
    assert new_head(recipe=str(recipe), scale="0.25")[1].config.scale == 0.25
    assert new_head()[1].config.head_dim == 16  # no recipe asked for: the initial model's head
    with pytest.raises(ValueError, match="no recipe"):
        new_head(recipe="nonexistent")


def test_a_stop_request_ends_training_after_its_epoch_and_publishes(client, monkeypatch):
    """DELETE /train/ asks the running training to stop (a file the trainer polls after every epoch) and waits
    for it to publish its best head; only what is still running after the grace period is killed."""
    from monailabel.endpoints import train as train_endpoint
    from monailabel.interfaces.utils.app import app_instance

    import textdiff.train
    from lib import server_guards

    stop_file = app_instance()._trainers["textdiff"].stop_file
    real_epoch = textdiff.train.train_epoch

    def epoch_then_stop(*args, **kwargs):  # the stop arrives while the first epoch runs
        stop_file.touch()
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(textdiff.train, "train_epoch", epoch_then_stop)
    response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 20})
    assert response.status_code == 200, response.text
    summary = json.loads((client.tmp / "published" / "training.json").read_text())
    assert summary["epochs_run"] == 1 and summary["stopped_early"]

    # the route: a running textdiff training is asked, not killed
    stop_file.unlink()
    running = [True, True]  # the training ends while the route waits
    monkeypatch.setattr(train_endpoint.AsyncTask, "status",
                        lambda *a, **k: ({"request": {"model": "textdiff"}}, None))
    monkeypatch.setattr(server_guards, "_training_runs", lambda: bool(running) and running.pop())
    killed = []
    monkeypatch.setattr(train_endpoint, "stop", lambda: killed.append(1))
    response = client.delete("/train/")
    assert response.status_code == 200 and response.json()["status"] == "stopped after its epoch"
    assert stop_file.exists() and not killed


def test_clicks_and_report_correct_a_label_the_way_slicer_sends_them(click_client):
    client = click_client
    info = client.get("/info/").json()["models"]["textdiff_interactive"]
    assert info["type"] == "deepedit" and info["labels"] == {"background": 0, "foreground": 1}

    def interactive(**params):
        return client.post("/infer/textdiff_interactive?image=case_1&output=image",
                           data={"params": json.dumps(params)})

    clicks = {"foreground": [[40, 40, 0]], "background": [[5, 5]], "report": "dense nuclei"}
    regions = interactive(**clicks)  # the initial model reads no clicks: they become regions of its label
    assert regions.status_code == 200, regions.text
    (client.tmp / "regions.png").write_bytes(regions.content)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(client.tmp / "regions.png")))
    assert label[40, 40] == 1 and label[5, 5] == 0  # each clicked pixel has its click's class
    assert interactive(report="x").status_code == 200  # without clicks it is the plain task
    assert client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1}).status_code == 200
    answered = interactive(**clicks)
    assert answered.status_code == 200, answered.text
    from monailabel.interfaces.utils.app import app_instance

    model = app_instance().task.store.current()
    assert model.config.clicks and model.memory is not None and model.memory.entries  # kept for the next round
    kept = len(model.memory.entries)
    assert interactive(foreground=[[41, 40]], background=[[5, 5]]).status_code == 200
    assert len(model.memory.entries) == kept  # the same image: its backbone maps were reused
    for bad, reason in (({"foreground": [[400, 40]]}, "outside"), ({"foreground": [["a", 40]]}, "finite numbers"),
                        ({"foreground": [[4, 4, 2]]}, "column, row"), ({"foreground": "40,40"}, "list"),
                        ({"foreground": [[4, 4]] * 5000}, "at most"), ({"background": [[1, float("inf")]]}, "finite"),
                        ({"tumour": [[4, 4]], "foreground": [[40, 40]]}, "unknown labels ['tumour']")):
        response = interactive(**bad)
        assert response.status_code == 400 and reason in response.text, (bad, response.status_code, response.text)


def test_points_for_a_structure_the_served_model_lacks_and_clicks_smuggled_into_the_plain_task_are_refused(
        two_class_client):
    client = two_class_client  # annotates cell and edge; serves the binary initial model until trained
    response = client.post("/infer/textdiff_interactive?image=case_1&output=image",
                           data={"params": json.dumps({"edge": [[4, 4]]})})
    assert response.status_code == 400 and "clicks" in response.text, response.text  # never ignored silently
    response = client.post("/infer/textdiff?image=case_1&output=image",
                           data={"params": json.dumps({"_clicks": [[4, 4]]})})
    assert response.status_code == 400 and "_clicks" in response.text, response.text
    plain = client.post("/infer/textdiff?image=case_1&output=image",
                        data={"params": json.dumps({"clicks": [[4, 4]], "foreground": "x"})})
    assert plain.status_code == 200  # keys the plain task does not read change nothing


def test_the_benchmark_times_plain_inference_and_click_rounds(tiny_model, lvit_folder, tmp_path, monkeypatch):
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import clear_cache

    from textdiff.benchmark import bench_infer, table

    for key in ("MONAI_LABEL_APP_DIR", "MONAI_LABEL_STUDIES", "MONAI_LABEL_APP_CONF",
                "MONAI_LABEL_AUTO_UPDATE_SCORING", "MONAI_LABEL_DATASTORE_AUTO_RELOAD"):
        monkeypatch.setattr(settings, key, getattr(settings, key))  # restored after the benchmark set them
    tiny_model.save(tmp_path / "initial")
    clear_cache()
    try:
        result = bench_infer(str(tmp_path / "initial"), lvit_folder / "img" / "case_0.png", requests=2,
                             background_images=0)
    finally:
        clear_cache()
    assert len(result["infer_1000px_all_s"]) == 2 and len(result["click_rounds_all_s"]) == 3
    assert result["click_round_1000px_s"] > 0 and "REST click round" in table(result)


def test_compact_heads_trained_in_the_app_keep_the_served_projection(tiny_model, lvit_folder, tmp_path, monkeypatch):
    """A recipe with compact features: the first head fits the projection, later heads reuse it (the datastore's
    cached features stay valid)."""
    import dataclasses

    monkeypatch.syspath_prepend(str(APP_DIR))
    from lib.model_store import ModelStore
    from lib.settings import AppSettings
    from lib.trainers.textdiff import TextDiffTrain
    from textdiff.data import read_lvit
    from textdiff.model import TextDiffModel
    from textdiff.train import TrainConfig, train

    kept = [2] * len(tiny_model.config.blocks)
    compact = TextDiffModel.build(dataclasses.replace(tiny_model.config, compact=kept, feature_channels=None,
                                                      weights=None), "cpu", seed=0)
    train(compact, read_lvit(lvit_folder)[:1], [], tmp_path / "initial", TrainConfig(epochs=1), progress=False)
    recipe = tmp_path / "compact.toml"
    recipe.write_text(f"[model]\ncompact = {kept}\n[train]\ntrain_steps = 2\n")
    settings = AppSettings.from_conf({"model": str(tmp_path / "initial"), "recipe": str(recipe)}, tmp_path)
    store = ModelStore(settings)
    trainer = TextDiffTrain(store, settings, lambda: None)
    fresh = TextDiffModel.build(trainer.new_model_config(), "cpu", seed=1)
    assert fresh.config.compact == kept and not fresh.projection.fitted
    kept_model = trainer.keep_projection(fresh)
    assert kept_model.projection.fitted and kept_model.projection.digest() == store.current().projection.digest()
    other = tmp_path / "other.toml"  # other counts: the served projection does not fit, the next training fits one
    other.write_text(f"[model]\ncompact = {[1] * len(kept)}\n[train]\ntrain_steps = 2\n")
    settings = settings.replace(recipe=str(other))
    trainer = TextDiffTrain(ModelStore(settings), settings, lambda: None)
    assert not trainer.keep_projection(TextDiffModel.build(trainer.new_model_config(), "cpu")).projection.fitted


def test_scores_reach_the_index_in_one_write_per_batch(client, monkeypatch):
    """Each write of the datastore index rewrites all of it: a pool's scores are written together, not per image."""
    from monailabel.interfaces.utils.app import app_instance

    store = app_instance().datastore()
    writes = []
    write = type(store)._update_datastore_file
    monkeypatch.setattr(type(store), "_update_datastore_file",  # (it calls itself once more holding the lock)
                        lambda self, lock=True: (writes.append(lock), write(self, lock)))
    scored = client.post("/scoring/textdiff_uncertainty?run_sync=true")
    assert scored.status_code == 200, scored.text
    assert scored.json()["scored"] == 2 and writes.count(True) == 1
    assert all(0 <= store.get_image_info(i)["textdiff_uncertainty"] <= 1 for i in ("case_1", "case_2"))


def test_an_image_the_head_cannot_score_costs_the_others_of_its_batch_nothing(client, monkeypatch):
    import lib.activelearning.uncertainty as uncertainty

    batched = uncertainty.cached_probabilities_many

    def refuse_case_2(model, images, *args, **kwargs):
        if any(image.name.startswith("case_2") for image in images):
            raise RuntimeError("cannot score this one")
        return batched(model, images, *args, **kwargs)

    monkeypatch.setattr(uncertainty, "cached_probabilities_many", refuse_case_2)
    scored = client.post("/scoring/textdiff_uncertainty?run_sync=true")
    assert scored.status_code == 200, scored.text
    assert scored.json()["scored"] == 1 and scored.json()["failed"] == ["case_2"]


def test_rescoring_after_a_new_head_runs_only_the_head(client, monkeypatch):
    """Scoring keeps each unlabeled image's frozen features in the cache the trainer uses: once a new head is
    published, the whole pool is scored again without a backbone pass."""
    from textdiff.model import TextDiffModel

    first = client.post("/scoring/textdiff_uncertainty?run_sync=true")
    assert first.status_code == 200, first.text
    cached = sorted((client.tmp / "feature-cache").glob("*.safetensors"))
    assert len(cached) == 2  # case_1, case_2
    response = client.post("/train/textdiff?run_sync=true", json={"max_epochs": 1})
    assert response.status_code == 200, response.text

    def no_backbone(self, windows):
        raise AssertionError("the backbone ran while rescoring")

    monkeypatch.setattr(TextDiffModel, "backbone_maps", no_backbone)
    from monailabel.interfaces.utils.app import app_instance

    before = {i: app_instance().datastore().get_image_info(i)["textdiff_uncertainty_model"] for i in ("case_1", "case_2")}
    again = client.post("/scoring/textdiff_uncertainty?run_sync=true")
    assert again.status_code == 200, again.text
    infos = {i: app_instance().datastore().get_image_info(i) for i in ("case_1", "case_2")}
    assert all(info["textdiff_uncertainty_model"] != before[i] for i, info in infos.items())  # the new head's scores
    assert all(0 <= info["textdiff_uncertainty"] <= 1 for info in infos.values())
