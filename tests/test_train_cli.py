"""Few-shot training (feature cache), evaluation and the CLI, end to end with tiny models on real image crops."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from textdiff.cli import main
from textdiff.data import read_image, read_lvit, read_mask
from textdiff.metrics import dice_iou
from textdiff.model import TextDiffModel
from textdiff.preprocess import grid_starts, tile_layout
from textdiff.train import FeatureCache, TrainConfig, train


def test_grid_starts_cover_with_minimal_overlap():
    assert grid_starts(256, 256) == [0]
    assert grid_starts(100, 256) == [0]
    assert grid_starts(500, 256) == [0, 244]
    assert grid_starts(512, 256) == [0, 256]


def test_tile_layout_pads_to_the_backbone_multiple_and_covers_the_image():
    assert tile_layout((500, 500), 256, 512, 8) == ((504, 504), (504, 504), [(0, 0)])
    assert tile_layout((100, 300), 256, 512, 8) == ((256, 304), (256, 304), [(0, 0)])
    padded, sides, starts = tile_layout((1000, 700), 256, 512, 32)
    assert padded == (1024, 704) and sides == (512, 512)
    assert {i for i, _ in starts} == {0, 512} and {j for _, j in starts} == {0, 192}


def test_cache_is_used_on_second_epoch_and_across_runs(tiny_model, lvit_folder, tmp_path):
    samples = read_lvit(lvit_folder)
    cache = FeatureCache(tiny_model, tmp_path / "cache")
    summary = train(tiny_model, samples[:2], samples[2:], tmp_path / "model", TrainConfig(epochs=2, batch_size=4),
                    progress=False, cache=cache)
    tiles = 3 * 4  # 96x96 crops in 64-px tiles: 4 per image (2 training images, 1 validation)
    assert cache.extractions == tiles  # each tile extracted once, not once per epoch
    assert summary["windows"] == 2 * 9  # each epoch cuts about as many 32-px windows as cover the images
    assert summary["epochs_run"] == 2 and len(summary["history"]) == 2
    # a second run in the same process reuses memory; a new cache object reads the disk copy
    train(tiny_model, samples[:2], samples[2:], tmp_path / "model", TrainConfig(epochs=1), progress=False, cache=cache)
    assert cache.extractions == tiles
    fresh = FeatureCache(tiny_model, tmp_path / "cache")
    train(tiny_model, samples[:2], samples[2:], tmp_path / "model", TrainConfig(epochs=1), progress=False, cache=fresh)
    assert fresh.extractions == 0
    # anything that shapes the features changes the key
    tiny_model.config.steps = [50]
    assert FeatureCache(tiny_model).key(samples[0], 0) != cache.key(samples[0], 0)


def test_cache_folder_is_pruned_least_recently_used_first(tiny_model, lvit_folder, tmp_path):
    import os

    samples = read_lvit(lvit_folder)[:3]
    folder = tmp_path / "cache"
    FeatureCache(tiny_model, folder, max_gb=None).get(samples[0])
    FeatureCache(tiny_model, folder, max_gb=None).get(samples[1])
    first, second = (folder / f"{FeatureCache(tiny_model).key(s, 0)}.safetensors" for s in samples[:2])
    size = first.stat().st_size
    os.utime(first, (1, 1))  # long unused
    os.utime(second, (2, 2))
    FeatureCache(tiny_model, folder, max_gb=None).get(samples[0])  # a cache hit marks the file as just used
    assert first.stat().st_mtime > second.stat().st_mtime
    # room for two files: the third image's features push out the least recently used one (the second image's)
    cache = FeatureCache(tiny_model, folder, max_gb=2.5 * size / 2**30)
    cache.get(samples[2])
    assert first.is_file() and not second.exists() and len(list(folder.glob("*.safetensors"))) == 2
    # files this cache has used are never deleted, even over the limit
    tiny = FeatureCache(tiny_model, folder, max_gb=0.1 * size / 2**30)
    tiny.get(samples[0])
    tiny.get(samples[1])
    assert first.is_file() and second.is_file()
    assert len(list(folder.glob("*.safetensors"))) == 2 and tiny.extractions == 4  # only the second was redone
    with pytest.raises(ValueError, match="positive"):
        FeatureCache(tiny_model, folder, max_gb=0)
    # the command-line prune: down to one file, then to none; a file the cache did not write (a model's weights
    # put in the wrong folder) is never touched
    (folder / "head-25233be246e1.safetensors").write_bytes(b"weights")
    assert main(["prune-cache", str(folder), "--max-gb", str(1.5 * size / 2**30)]) == 0
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted([second.name, "head-25233be246e1.safetensors"])
    assert main(["prune-cache", str(folder)]) == 0
    assert [p.name for p in folder.glob("*.safetensors")] == ["head-25233be246e1.safetensors"]


def test_building_a_model_lets_large_blocks_come_from_the_reused_heap(tiny_model, monkeypatch):
    """After a model is built, a 64 MB tensor comes from glibc's heap, not from a fresh mmap (which glibc's
    defaults use for any block above 32 MB); a user's own MALLOC_ settings are left alone."""
    import ctypes

    import torch

    from textdiff.accel import heap

    libc = heap._libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc >= 2.33")

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc.mallinfo2.restype = Mallinfo2
    mapped_before = libc.mallinfo2().hblkhd
    block = torch.empty(64 << 20, dtype=torch.uint8)
    assert libc.mallinfo2().hblkhd - mapped_before < 64 << 20
    del block
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert heap.reuse_freed_heap() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert heap.reuse_freed_heap() is True


def test_heap_is_trimmed_every_few_extracted_images(tiny_model, lvit_folder, monkeypatch):
    import textdiff.train as train_module

    assert isinstance(train_module.release_free_heap(), bool)  # glibc here: frees pages, never raises
    calls = []
    monkeypatch.setattr(train_module, "release_free_heap", lambda: calls.append(1) or True)
    monkeypatch.setattr(train_module, "TRIM_EVERY", 2)
    cache = FeatureCache(tiny_model)
    samples = read_lvit(lvit_folder)
    for sample in samples:
        cache.get(sample)
    assert len(calls) == len(samples) // 2
    cache.get(samples[0])  # a cache hit extracts nothing and trims nothing
    assert len(calls) == len(samples) // 2


def test_disk_cache_is_memory_mapped_and_equal_to_a_fresh_extraction(tiny_model, lvit_folder, tmp_path):
    import torch
    from safetensors.torch import save_file

    from textdiff.train import map_safetensors

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(2, 2, 2).half(), "c": torch.randn(7)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"k": "v"})
    mapped, meta = map_safetensors(tmp_path / "t.safetensors")
    assert meta == {"k": "v"} and set(mapped) == set(tensors)
    for name, tensor in tensors.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name], tensor)

    sample = read_lvit(lvit_folder)[0]
    on_disk = FeatureCache(tiny_model, tmp_path / "cache").get(sample)
    in_memory = FeatureCache(tiny_model).get(sample)
    for a, b in zip(on_disk.tiles, in_memory.tiles):
        for x, y in zip(a.features, b.features):
            assert torch.equal(x, y)
            assert not x.untyped_storage().resizable()  # a view of the file's map, not a copy in RAM
            assert y.untyped_storage().resizable()


def test_cached_maps_batch_channels_last_and_other_layouts_are_extracted_again(tiny_model, lvit_folder, tmp_path):
    import torch
    from safetensors.torch import save_file

    from textdiff.train import map_safetensors, stack_windows

    sample = read_lvit(lvit_folder)[0]
    cache = FeatureCache(tiny_model, tmp_path / "cache")
    fresh = cache.get(sample)
    crops = [f[:, :4, 2:6] for f in fresh.tiles[0].features]
    for crop in crops:
        batch = stack_windows([crop, crop])
        assert batch.is_contiguous(memory_format=torch.channels_last) and torch.equal(batch[1], crop)
    [path] = (tmp_path / "cache").glob("*.safetensors")
    tensors, meta = map_safetensors(path)
    assert meta["layout"] == "hwc"
    reader = FeatureCache(tiny_model, tmp_path / "cache")
    again = reader.get(sample)
    assert reader.extractions == 0
    for a, b in zip(again.tiles, fresh.tiles):
        for x, y in zip(a.features, b.features):
            assert torch.equal(x, y) and not x.untyped_storage().resizable()
    # a file of another layout (untagged, or a newer install's) is extracted again, never misread
    other = {name: t.permute(2, 0, 1).contiguous() for name, t in tensors.items()}
    for metadata in ({k: v for k, v in meta.items() if k != "layout"}, dict(meta, layout="some-future-layout")):
        save_file(other, str(path), metadata=metadata)
        reader = FeatureCache(tiny_model, tmp_path / "cache")
        again = reader.get(sample)
        assert reader.extractions == len(fresh.tiles)
        for a, b in zip(again.tiles, fresh.tiles):
            for x, y in zip(a.features, b.features):
                assert torch.equal(x, y)


def test_a_step_budget_sets_the_epochs_and_validation_runs_about_ten_times(tiny_model, lvit_folder, tmp_path):
    samples = read_lvit(lvit_folder)
    # 2 images of 96 px in 32 px windows: 18 windows, 5 steps of 4 per epoch; 100 steps -> 20 epochs
    summary = train(tiny_model, samples[:2], samples[2:], tmp_path / "m", TrainConfig(train_steps=100), progress=False)
    assert summary["epochs"] == summary["epochs_run"] == 20
    assert [h["epoch"] for h in summary["history"] if "dice" in h] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]


def test_the_moving_average_is_what_is_validated_and_saved(tiny_model, lvit_folder, tmp_path):
    """With ema the saved head is the average of the trained weights; select "last" keeps the last epoch's even
    when an earlier one validated better."""
    import torch

    from textdiff.model import TextDiffModel

    samples = read_lvit(lvit_folder)
    trained = {}
    real_update = torch.optim.swa_utils.AveragedModel.update_parameters

    def spy(self, model):
        real_update(self, model)
        trained["head"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trained["average"] = {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    torch.optim.swa_utils.AveragedModel.update_parameters = spy
    try:
        summary = train(tiny_model, samples[:2], samples[2:], tmp_path / "m",
                        TrainConfig(epochs=4, ema=0.9, select="last", lr=3e-3), progress=False)
    finally:
        torch.optim.swa_utils.AveragedModel.update_parameters = real_update
    saved = TextDiffModel.load(tmp_path / "m", "cpu").head.state_dict()
    assert summary["best"]["epoch"] == 4
    for name, value in saved.items():
        torch.testing.assert_close(value, trained["average"][name])
    assert any(not torch.allclose(saved[k], trained["head"][k]) for k in saved)
    with pytest.raises(ValueError, match="ema must be in"):
        train(tiny_model, samples[:2], [], tmp_path / "x", TrainConfig(epochs=1, ema=1.0), progress=False)
    with pytest.raises(ValueError, match="select must be"):
        train(tiny_model, samples[:2], [], tmp_path / "x", TrainConfig(epochs=1, select="worst"), progress=False)


def test_unlabeled_images_train_the_head_without_their_masks_being_read(tiny_model, lvit_folder, tmp_path):
    import copy
    import shutil

    samples = read_lvit(lvit_folder)
    pool = tmp_path / "pool"
    shutil.copytree(lvit_folder, pool)
    shutil.rmtree(pool / "labelcol")  # an unlabeled pool: images (and reports), no masks
    unlabeled = read_lvit(pool, require_masks=False)
    assert all(s.mask is None for s in unlabeled)
    start = copy.deepcopy(tiny_model.head.state_dict())
    heads = {}
    for weight in (0.0, 1.0):  # the same windows drawn either way: only the consistency loss differs
        tiny_model.head.load_state_dict(start)
        config = TrainConfig(epochs=2, ema=0.9, select="last", pseudo_threshold=0.0, unlabeled_weight=weight)
        summary = train(tiny_model, samples[:1], [], tmp_path / "m", config, progress=False,
                        unlabeled_samples=unlabeled)
        assert summary["unlabeled_images"] == 3
        heads[weight] = copy.deepcopy(tiny_model.head.state_dict())
    assert any(not torch_equal(heads[0.0][k], heads[1.0][k]) for k in start)
    with pytest.raises(ValueError, match="needs a teacher"):
        train(tiny_model, samples[:1], [], tmp_path / "c", TrainConfig(epochs=1), progress=False,
              unlabeled_samples=unlabeled)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_validation_every_n_epochs_and_after_the_last(tiny_model, lvit_folder, tmp_path):
    samples = read_lvit(lvit_folder)
    summary = train(tiny_model, samples[:2], samples[2:], tmp_path / "model", TrainConfig(epochs=5, val_every=2),
                    progress=False)
    assert [h["epoch"] for h in summary["history"] if "dice" in h] == [2, 4, 5]
    assert summary["best"]["epoch"] in (2, 4, 5)
    with pytest.raises(ValueError, match="val_every"):
        train(tiny_model, samples[:2], [], tmp_path / "m2", TrainConfig(epochs=1, val_every=0), progress=False)


def test_a_stopped_run_resumes_to_the_same_head_as_an_uninterrupted_one(tiny_model, lvit_folder, tmp_path):
    import copy

    import torch

    from textdiff.train import TRAIN_STATE_NAME

    samples = read_lvit(lvit_folder)
    initial = copy.deepcopy(tiny_model.head.state_dict())
    cache = FeatureCache(tiny_model)
    config = TrainConfig(epochs=3, val_every=2, checkpoint=True)
    whole = train(tiny_model, samples[:2], samples[2:], tmp_path / "whole", config, progress=False, cache=cache)
    whole_head = copy.deepcopy(tiny_model.head.state_dict())
    assert not (tmp_path / "whole" / TRAIN_STATE_NAME).exists()  # a complete run leaves nothing to resume

    tiny_model.head.load_state_dict(initial)
    calls = []
    train(tiny_model, samples[:2], samples[2:], tmp_path / "parts", config, progress=False, cache=cache,
          should_stop=lambda: calls.append(1) or len(calls) == 2)  # stopped after epoch 2 of 3
    assert (tmp_path / "parts" / TRAIN_STATE_NAME).is_file()
    tiny_model.head.load_state_dict(initial)  # what a new process would build
    config.resume = True
    resumed = train(tiny_model, samples[:2], samples[2:], tmp_path / "parts", config, progress=False, cache=cache)
    assert resumed["resumed_at_epoch"] == 3 and resumed["epochs_run"] == 3
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    assert resumed["best"] == whole["best"]
    for name, value in tiny_model.head.state_dict().items():
        torch.testing.assert_close(value, whole_head[name], rtol=0, atol=0)
    assert not (tmp_path / "parts" / TRAIN_STATE_NAME).exists()


def test_resuming_with_other_options_or_a_damaged_state_fails_before_extracting(tiny_model, lvit_folder, tmp_path):
    from textdiff.train import TRAIN_STATE_NAME

    samples = read_lvit(lvit_folder)
    out = tmp_path / "model"
    train(tiny_model, samples[:2], samples[2:], out, TrainConfig(epochs=3, checkpoint=True), progress=False,
          should_stop=lambda: True)
    state = (out / TRAIN_STATE_NAME).read_bytes()
    cache = FeatureCache(tiny_model)
    for changed in (TrainConfig(epochs=3, lr=1e-4, resume=True), TrainConfig(epochs=4, resume=True)):
        with pytest.raises(ValueError, match="other data or options"):
            train(tiny_model, samples[:2], samples[2:], out, changed, progress=False, cache=cache)
    with pytest.raises(ValueError, match="other data or options"):  # other training images
        train(tiny_model, samples[1:3], samples[2:], out, TrainConfig(epochs=3, resume=True), progress=False,
              cache=cache)
    (out / TRAIN_STATE_NAME).write_bytes(state[: len(state) // 2])
    with pytest.raises(ValueError, match="cannot read the training state"):
        train(tiny_model, samples[:2], samples[2:], out, TrainConfig(epochs=3, resume=True), progress=False,
              cache=cache)
    assert cache.extractions == 0
    assert (out / TRAIN_STATE_NAME).read_bytes() == state[: len(state) // 2]  # kept for the user to look at
    # without resuming, a run starts over and replaces the state
    summary = train(tiny_model, samples[:2], samples[2:], out, TrainConfig(epochs=2, checkpoint=True),
                    progress=False, cache=cache)
    assert summary["resumed_at_epoch"] is None and not (out / TRAIN_STATE_NAME).exists()


def test_several_structures_train_and_evaluate_per_class(lvit_folder, tiny_unet_dir, tiny_encoder_dir, tmp_path,
                                                           capsys):
    """Class-index masks in another mask folder: one head for all classes, Dice per class and their mean."""
    from PIL import Image as PILImage

    from textdiff.cli import build_parser

    two = lvit_folder / "labelcol_two"
    two.mkdir()
    for mask in sorted((lvit_folder / "labelcol").iterdir()):
        binary = np.asarray(PILImage.open(mask)) > 0
        label = binary.astype(np.uint8)  # 1 = "cell" where the binary mask is set; 2 = "edge" in a band around it
        label[(label == 0) & np.roll(binary, 3, axis=1)] = 2
        PILImage.fromarray(label).save(two / mask.name)
    model_dir = tmp_path / "model"
    common = ["--backbone", str(tiny_unet_dir), "--text-encoder", str(tiny_encoder_dir), "--window", "32",
              "--companion-steps", "3"]
    assert main(["train", "--data", str(lvit_folder), "--out", str(model_dir), "--masks", "labelcol_two",
                 "--labels", "cell,edge", "--epochs", "1", "--head-dim", "16", *common]) == 0
    assert json.loads((model_dir / "config.json").read_text())["labels"] == {"background": 0, "cell": 1, "edge": 2}
    capsys.readouterr()
    assert main(["evaluate", "--data", str(lvit_folder), "--model", str(model_dir), "--masks", "labelcol_two",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["per_class"]) == {"cell", "edge"}
    assert result["dice"] == pytest.approx(np.mean([v["dice"] for v in result["per_image"].values()]))
    assert np.mean([c["dice"] for c in result["per_class"].values()]) == pytest.approx(result["dice"], abs=1e-3)
    assert main(["evaluate", "--data", str(lvit_folder), "--model", str(model_dir), "--masks", "labelcol_two"]) == 0
    assert "class edge" in capsys.readouterr().out
    # a union of classes scored as one structure: the same Dice as the binary masks score on the union
    assert main(["evaluate", "--data", str(lvit_folder), "--model", str(model_dir), "--masks", "labelcol_two",
                 "--region", "both=cell+edge", "--json"]) == 0
    both = json.loads(capsys.readouterr().out)["per_region"]["both"]
    model = TextDiffModel.load(model_dir)
    expected = []
    for sample in read_lvit(lvit_folder, masks="labelcol_two"):
        label = model.predict(read_image(sample.image), sample.report)
        truth = read_mask(sample.mask, 3)
        expected.append(dice_iou(label > 0, truth > 0)[0])
    assert both["dice"] == pytest.approx(np.mean(expected), abs=1e-6)
    assert main(["evaluate", "--data", str(lvit_folder), "--model", str(model_dir), "--masks", "labelcol_two",
                 "--region", "x=cell+nucleus"]) == 2
    assert "'nucleus'" in capsys.readouterr().err
    # a 3-class mask for a binary model is refused with its values, and mask folders are names, not paths
    binary_dir = tmp_path / "binary"
    assert main(["train", "--data", str(lvit_folder), "--out", str(binary_dir), "--masks", "labelcol_two",
                 "--epochs", "1", "--head-dim", "16", *common]) != 0
    assert "not in 0..1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="folder name"):
        read_lvit(lvit_folder, masks="../labelcol")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--labels", "background,x"])


def test_cli_train_killed_then_resumed(lvit_folder, tiny_unet_dir, tiny_encoder_dir, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    from textdiff.train import TRAIN_STATE_NAME

    out = tmp_path / "model"
    command = ["train", "--data", str(lvit_folder), "--val", str(lvit_folder), "--out", str(out), "--epochs", "60",
               "--backbone", str(tiny_unet_dir), "--text-encoder", str(tiny_encoder_dir), "--window", "32",
               "--head-dim", "16", "--cache-dir", str(tmp_path / "cache"), "--companion-steps", "3"]
    process = subprocess.Popen([sys.executable, "-m", "textdiff.cli", *command], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=os.environ)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / TRAIN_STATE_NAME).is_file():
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / TRAIN_STATE_NAME).is_file()
    assert main(command) == 0  # without --resume: a note, then a fresh start
    assert "--resume continues it" in capsys.readouterr().err
    process = subprocess.Popen([sys.executable, "-m", "textdiff.cli", *command], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=os.environ)
    while time.time() < deadline and not (out / TRAIN_STATE_NAME).is_file():
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert main([*command, "--resume"]) == 0
    summary = json.loads((out / "training.json").read_text())
    assert summary["resumed_at_epoch"] > 1 and summary["epochs_run"] == 60
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 61))
    assert not (out / TRAIN_STATE_NAME).exists()
    capsys.readouterr()
    assert main([*command, "--epochs", "2", "--resume"]) == 0  # nothing to resume: said, then a fresh run
    assert "no training state" in capsys.readouterr().err


def test_the_seed_decides_the_heads_initialisation(tiny_model):
    import torch

    from textdiff.model import TextDiffModel

    def head(seed):
        torch.rand(7)  # whatever ran before must not matter
        model = TextDiffModel.build(tiny_model.config, "cpu", tiny_model.features.unet, tiny_model.encoder, seed=seed)
        return torch.cat([p.flatten() for p in model.head.parameters()])

    before = torch.get_rng_state()
    assert torch.equal(head(3), head(3))
    assert not torch.equal(head(3), head(4))
    torch.set_rng_state(before)
    torch.rand(7)
    unseeded = torch.get_rng_state()
    torch.set_rng_state(before)
    head(3)
    assert torch.equal(torch.get_rng_state(), unseeded)  # a seeded build leaves the global RNG as it was


def test_unwritable_feature_cache_costs_the_cache_not_the_training(tiny_model, lvit_folder, tmp_path):
    samples = read_lvit(lvit_folder)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="feature cache not written"):
        summary = train(tiny_model, samples[:2], samples[2:], tmp_path / "model", TrainConfig(epochs=2),
                        progress=False, cache=FeatureCache(tiny_model, blocked))
    assert summary["epochs_run"] == 2 and summary["best"]["dice"] is not None
    assert (tmp_path / "model" / "config.json").is_file()


def test_training_learns_on_real_crops(tiny_model, lvit_folder, tmp_path):
    """Even a tiny random backbone + head separates nuclei from background well above chance."""
    samples = read_lvit(lvit_folder)
    summary = train(tiny_model, samples, samples, tmp_path / "model", TrainConfig(epochs=15, lr=3e-3), progress=False)
    assert summary["best"]["dice"] > 0.55
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]


def test_cli_train_evaluate_infer(lvit_folder, tiny_unet_dir, tiny_encoder_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    common = ["--backbone", str(tiny_unet_dir), "--text-encoder", str(tiny_encoder_dir), "--window", "32"]
    assert main(["train", "--data", str(lvit_folder), "--val", str(lvit_folder), "--out", str(model_dir),
                 "--epochs", "2", "--head-dim", "16", "--companion-steps", "3", *common]) == 0
    # the default recipe trains a companion U-Net; the line says so and gives the Dice of the two together
    assert "companion U-Net of 3 steps, val Dice" in capsys.readouterr().err
    config = json.loads((model_dir / "config.json").read_text())
    assert config["companion"] == [16, 32, 64, 128, 256]
    assert config["backbone"] == str(tiny_unet_dir) and config["blocks"] and config["steps"] == [50, 150, 250]
    assert (model_dir / config["weights"]).is_file()
    assert config["position"] is True  # the default: report attention knows where each token lies
    plain_dir = tmp_path / "no-position"
    assert main(["train", "--data", str(lvit_folder), "--out", str(plain_dir), "--epochs", "1", "--head-dim", "16",
                 "--no-position", "--test-time-variants", "2", "--subpixel", "--companion", "0", *common]) == 0
    from textdiff.model import TextDiffModel

    plain = TextDiffModel.load(plain_dir)
    assert plain.companion is None and plain.config.companion is None
    assert plain.config.position is False and plain.config.test_time_variants == 2
    assert all(getattr(m, "position", None) is None for m in plain.head.fuse_text)
    assert config["subpixel"] is False and plain.config.subpixel is True and plain.head.subpixel
    assert main(["evaluate", "--data", str(lvit_folder), "--model", str(plain_dir), "--json"]) == 0

    capsys.readouterr()
    assert main(["evaluate", "--data", str(lvit_folder), "--model", str(model_dir), "--json",
                 "--overlays", str(tmp_path / "overlays")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 3 and 0 <= result["dice"] <= 1 and set(result["per_image"]) == {"case_0.png", "case_1.png", "case_2.png"}
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 3
    assert main(["evaluate", "--data", str(lvit_folder), "--model", str(model_dir), "--json",
                 "--test-time-variants", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 3
    assert main(["evaluate", "--data", str(lvit_folder), "--model", str(model_dir), "--test-time-variants", "9"]) == 2
    assert "test-time variants must be in 1..8" in capsys.readouterr().err

    image = lvit_folder / "img" / "case_0.png"
    assert main(["infer", "--model", str(model_dir), "--image", str(image), "--report", "dense nuclei",
                 "--out", str(tmp_path / "label.png")]) == 0
    label = read_image(tmp_path / "label.png").array[..., 0]
    assert label.shape == read_image(image).array.shape[:2]
    assert set(np.unique(label)) <= {0, 1}


def test_cli_reports_bad_input_clearly(lvit_folder, tmp_path, capsys):
    assert main(["evaluate", "--data", str(tmp_path), "--model", str(tmp_path)]) == 2
    assert "not an LViT folder" in capsys.readouterr().err
    image = str(lvit_folder / "img" / "case_0.png")
    assert main(["infer", "--model", str(tmp_path), "--image", image, "--out", str(tmp_path / "y.png")]) == 2
    assert "not a TextDiff model folder" in capsys.readouterr().err
    assert main(["infer", "--model", str(tmp_path), "--image", str(tmp_path / "x.png"), "--out", "y.png"]) == 2
    assert "x.png" in capsys.readouterr().err
    # an output no label can be written to is refused before the model is loaded or run (lossy JPEG included)
    for out in ("y.txt", "y.jpg", "y"):
        assert main(["infer", "--model", "default", "--image", image, "--out", str(tmp_path / out)]) == 2
        assert "label cannot be written as" in capsys.readouterr().err
    assert not list(tmp_path.glob("y*"))


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "evaluate", "infer", "pretrain"))


def test_cli_train_under_torchrun_with_two_cpu_processes(lvit_folder, tiny_unet_dir, tiny_encoder_dir, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp-model"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "textdiff.cli", "train", "--data", str(lvit_folder), "--val", str(lvit_folder), "--out", str(out),
               "--backbone", str(tiny_unet_dir), "--text-encoder", str(tiny_encoder_dir), "--window", "32",
               "--head-dim", "16", "--companion-steps", "3", "--epochs", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs_run"] == 2 and summary["best"]["dice"] is not None
    # killed midway, then resumed: every rank picks up its own sampling stream
    import time

    from textdiff.train import TRAIN_STATE_NAME

    longer = [*command[:-1], "8"]  # ~1 s per epoch under DDP: the kill lands well before the end
    import psutil

    process = subprocess.Popen(longer, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / TRAIN_STATE_NAME).is_file():
        time.sleep(0.01)
    launcher = psutil.Process(process.pid)
    tree = [*launcher.children(recursive=True), launcher]  # torchrun starts each worker in its own session
    for member in tree:
        member.kill()
    process.wait()
    psutil.wait_procs(tree, timeout=30)
    assert (out / TRAIN_STATE_NAME).is_file()
    result = subprocess.run([*longer, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["resumed_at_epoch"] > 1 and summary["epochs_run"] == 8
    assert not (out / TRAIN_STATE_NAME).exists()


def test_benchmark_reference_loop_times_its_steps_after_one_untimed_warm_up_step(tiny_model, lvit_folder,
                                                                                 monkeypatch):
    import textdiff.benchmark as benchmark
    from textdiff.data import read_lvit

    forwards = []
    naive = benchmark.naive_features
    monkeypatch.setattr(benchmark, "naive_features", lambda *a, **k: forwards.append(1) or naive(*a, **k))
    samples = read_lvit(lvit_folder)
    assert benchmark._reference_train_steps(tiny_model, samples, 2) > 0
    assert len(forwards) == 3  # the warm-up step, then the 2 timed ones


def test_benchmark_totals_the_fast_loops_remaining_epochs_from_its_steady_epochs():
    """The first measured epoch also warms up: it counts as run, and the rest are totalled from the later ones."""
    from textdiff.benchmark import steady_epoch_s

    assert steady_epoch_s([{"train_s": 9.0}, {"train_s": 5.0}, {"train_s": 6.0}]) == 5.5
    assert steady_epoch_s([{"train_s": 9.0}]) == 9.0


def test_benchmark_blocks_replace_the_models_blocks_and_an_earlier_exit_skips_more(tiny_model, tiny_unet_dir,
                                                                                     lvit_folder, tmp_path):
    from textdiff import benchmark

    tiny_model.save(tmp_path / "model")
    common = dict(backbone=str(tiny_unet_dir), data=lvit_folder.parent, model_dir=str(tmp_path / "model"), windows=1,
                  skip=("train", "infer"))
    recipe = benchmark.run(**common)
    shallow = benchmark.run(**common, blocks=[0])
    assert recipe["blocks"] == list(tiny_model.config.blocks) != [0] and shallow["blocks"] == [0]
    assert shallow["extract_flop_ratio"] > recipe["extract_flop_ratio"]
    assert "blocks: [0]" in benchmark.table(shallow)


def test_benchmark_refuses_counts_that_would_time_nothing_before_loading_anything(lvit_folder, capsys):
    for option in (["--reference-steps", "0"], ["--measured-epochs", "0"], ["--epochs", "2"]):
        assert main(["benchmark", "--data", str(lvit_folder.parent), *option]) == 2
        assert "reference steps >= 1 and epochs >= measured epochs" in capsys.readouterr().err


def test_recipes_give_the_shipped_recipe_and_options_override_them(tmp_path):
    from textdiff.cli import build_parser, recipe_configs

    def configs(*extra):
        return recipe_configs(build_parser().parse_args(["train", "--data", "d", "--out", "o", *extra]))

    model, train_kw = configs()
    assert model["scale"] == 0.6 and model["tile"] == 304 and model["labels"] == {"background": 0, "nucleus": 1}
    assert train_kw["train_steps"] == 330 and train_kw["select"] == "last"
    assert "window" not in model  # the dataclass default applies
    model, train_kw = configs("--scale", "0.5", "--epochs", "3", "--no-text", "--cache-max-gb", "0")
    assert model["scale"] == 0.5 and model["use_text"] is False and train_kw["epochs"] == 3
    assert train_kw.get("train_steps") is None  # epochs given: the recipe's step budget no longer decides them
    assert train_kw["cache_max_gb"] is None
    model, _ = configs("--recipe", "chest-xray")
    assert model["blocks"] == [0, 2] and model["scale"] == 1.0
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nscael = 0.6\n")
    with pytest.raises(ValueError, match="scael"):
        configs("--recipe", str(bad))
    with pytest.raises(ValueError, match="no recipe"):
        configs("--recipe", "nonexistent")


def test_eight_bit_cache_is_half_the_size_close_to_the_16_bit_maps_and_trains(tiny_model, lvit_folder, tmp_path):
    import torch

    from textdiff.train import QuantizedMap, stack_windows

    sample = read_lvit(lvit_folder)[0]
    exact = FeatureCache(tiny_model, tmp_path / "c16").get(sample)
    small = FeatureCache(tiny_model, tmp_path / "c8", bits=8)
    coded = small.get(sample)
    read_back = FeatureCache(tiny_model, tmp_path / "c8", bits=8)
    again = read_back.get(sample)
    assert read_back.extractions == 0
    [wide] = (tmp_path / "c16").glob("*.safetensors")
    [narrow] = (tmp_path / "c8").glob("*.safetensors")
    assert narrow.stat().st_size < 0.55 * wide.stat().st_size
    for x, q, r in zip(exact.tiles[0].features, coded.tiles[0].features, again.tiles[0].features):
        assert isinstance(q, QuantizedMap) and isinstance(r, QuantizedMap) and r.codes.dtype == torch.uint8
        assert torch.equal(q[:], r[:]) and q[:].dtype == x.dtype
        span = (x.float().amax(dim=(1, 2)) - x.float().amin(dim=(1, 2)))[:, None, None]
        error = (q[:].float() - x.float()).abs()
        assert (error <= span / 255 * 0.5 + x.float().abs() / 128 + 1e-6).all()  # half a step (+ 16-bit rounding)
        crop = q[:, :4, 2:6]
        assert torch.equal(crop, q[:][:, :4, 2:6])
        assert stack_windows([crop, crop]).is_contiguous(memory_format=torch.channels_last)
    config = TrainConfig(epochs=1, batch_size=2, cache_dir=str(tmp_path / "c8"), cache_bits=8)
    summary = train(tiny_model, [sample], [sample], tmp_path / "out", config, progress=False)
    assert 0 <= summary["best"]["dice"] <= 1
    with pytest.raises(ValueError, match="8 or 16"):
        FeatureCache(tiny_model, bits=4)


def test_compact_projection_fits_shrinks_the_cache_saves_and_predicts_the_same_after_load(tiny_model, lvit_folder,
                                                                                          tmp_path):
    import dataclasses

    import torch

    from textdiff.model import TextDiffModel

    samples = read_lvit(lvit_folder)
    blocks = len(tiny_model.config.blocks)
    kept = [max(1, c // 4) for c in tiny_model.config.feature_channels[:blocks]]
    config = dataclasses.replace(tiny_model.config, compact=kept, feature_channels=None, weights=None)
    model = TextDiffModel.build(config, "cpu", seed=0)
    with pytest.raises(ValueError, match="fit the model's compact projection"):
        FeatureCache(model)
    out = tmp_path / "compact"
    train(model, samples[:2], [], out, TrainConfig(epochs=1, batch_size=2, cache_dir=str(tmp_path / "cache")),
          progress=False)
    assert model.projection.fitted
    cached = FeatureCache(model).get(samples[0])
    assert [f.shape[0] for f in cached.tiles[0].features][:blocks] == kept
    # the projection is principal directions: orthonormal, and it keeps more variance than any other k directions
    basis = model.projection.get_buffer("basis0")
    torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-4, rtol=0)
    raw = model.features(model.prepare(read_image(samples[1].image).array)[None])[0]
    pixels = raw.float().permute(0, 2, 3, 1).reshape(-1, raw.shape[1])
    centred = pixels - model.projection.get_buffer("mean0")
    kept_variance = (centred @ basis).pow(2).sum()
    random_basis = torch.linalg.qr(torch.randn(basis.shape, generator=torch.Generator().manual_seed(0)))[0]
    assert kept_variance > (centred @ random_basis).pow(2).sum()
    loaded = TextDiffModel.load(out, "cpu")
    assert loaded.config.compact == kept and loaded.projection.digest() == model.projection.digest()
    image = read_image(samples[2].image).array
    torch.testing.assert_close(loaded.predict_proba(image, "x"), model.eval().predict_proba(image, "x"))
    again = TextDiffModel.build(dataclasses.replace(config, feature_channels=None, weights=None), "cpu", seed=0)
    with pytest.raises(ValueError, match="never fitted"):
        again.save(tmp_path / "unfitted")


def test_a_one_pass_reader_holds_no_entries(tiny_model, lvit_folder, tmp_path):
    samples = read_lvit(lvit_folder)
    cache = FeatureCache(tiny_model, tmp_path / "cache")
    for sample in samples:
        cache.get(sample, labeled=False, keep=False)  # extracted and written
    extracted = cache.extractions
    for sample in samples:
        cache.get(sample, labeled=False, keep=False)  # read back from the folder
    assert not cache.memory and cache.extractions == extracted > 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == len(samples)


def test_a_companion_unet_trains_after_the_head_saves_and_is_averaged_into_inference(tiny_unet_dir, tiny_encoder_dir,
                                                                                       lvit_folder, tmp_path):
    from textdiff import companion, preprocess
    from textdiff.data import read_image
    from textdiff.model import ModelConfig, TextDiffModel

    config = ModelConfig(backbone=str(tiny_unet_dir), text_encoder=str(tiny_encoder_dir), window=32, tile=64,
                         head_dim=16, precision="fp32", companion=[4, 8, 16], companion_weight=0.25)
    model = TextDiffModel.build(config, "cpu", seed=0)
    samples = read_lvit(lvit_folder)
    untrained = {k: v.clone() for k, v in model.companion.state_dict().items()}
    summary = train(model, samples, samples, tmp_path / "model", TrainConfig(epochs=1, companion_steps=6),
                    progress=False)
    assert summary["companion"]["steps"] == 6 and 0 <= summary["companion"]["dice"] <= 1
    assert any(not torch.equal(untrained[k], v) for k, v in model.companion.state_dict().items())
    loaded = TextDiffModel.load(tmp_path / "model", "cpu")
    for name, value in model.companion.state_dict().items():
        assert torch.equal(loaded.companion.state_dict()[name], value)
    # inference: 3/4 of the head's probabilities plus 1/4 of the companion's, on the same working image
    image = read_image(samples[0].image)
    together = loaded.predict_image_proba(image, samples[0].report)
    x = loaded.prepare(image.array)[None]
    partner = preprocess.resize_to(companion.probabilities(loaded.companion, x, 32), image.size_hw)
    partner_net, loaded.companion = loaded.companion, None
    head_alone = loaded.predict_image_proba(image, samples[0].report)
    assert not torch.allclose(head_alone, partner, atol=1e-3)
    torch.testing.assert_close(together, 0.75 * head_alone + 0.25 * partner, atol=1e-5, rtol=1e-5)
    # with the click memory on, a second look at the same image runs neither the backbone nor the companion again
    loaded.companion = partner_net
    loaded.keep_features(64)
    first = loaded.predict_image_proba(image, samples[0].report)
    calls = []
    loaded.companion.register_forward_hook(lambda *_: calls.append(1))
    loaded.features.register_forward_hook(lambda *_: calls.append(1))
    torch.testing.assert_close(loaded.predict_image_proba(image, samples[0].report), first)
    assert not calls
    # the same companion trains the same from the same seed: the U-Net baseline of the curves is this training
    again, steps = companion.train_new([4, 8, 16], samples, 3, 2, 1.0, 32, 6, seed=0)
    assert steps == 6
    for name, value in again.state_dict().items():
        torch.testing.assert_close(value, partner_net.state_dict()[name])


def test_a_run_stopped_before_the_companion_is_trained_keeps_the_head_alone(tiny_unet_dir, tiny_encoder_dir,
                                                                             lvit_folder, tmp_path):
    from textdiff.model import ModelConfig, TextDiffModel

    def config(**changes):
        return ModelConfig(**dict(backbone=str(tiny_unet_dir), text_encoder=str(tiny_encoder_dir), window=32, tile=64,
                                  head_dim=16, precision="fp32", companion=[4, 8]) | changes)

    samples = read_lvit(lvit_folder)
    summary = train(TextDiffModel.build(config(), "cpu", seed=0), samples, [], tmp_path / "model",
                    TrainConfig(epochs=3, companion_steps=100), progress=False, should_stop=lambda: True)
    assert summary["epochs_run"] == 1 and "dropped" in summary["companion"]
    loaded = TextDiffModel.load(tmp_path / "model", "cpu")
    assert loaded.companion is None and loaded.config.companion is None
    with pytest.raises(ValueError, match="companion_steps"):
        train(TextDiffModel.build(config(), "cpu"), samples, [], tmp_path / "other", TrainConfig(companion_steps=0))
    with pytest.raises(ValueError, match="divisible"):
        TextDiffModel.build(config(companion=[4, 8, 16, 32, 64, 128, 256]), "cpu")


def test_the_benchmark_times_inference_with_and_without_the_companion(tiny_unet_dir, tiny_encoder_dir, lvit_folder,
                                                                      tmp_path):
    from textdiff.benchmark import bench_companion, table
    from textdiff.model import ModelConfig

    def saved(folder, **changes):
        config = ModelConfig(**dict(backbone=str(tiny_unet_dir), text_encoder=str(tiny_encoder_dir), window=32,
                                    tile=64, head_dim=16, precision="fp32") | changes)
        return TextDiffModel.build(config, "cpu", seed=0).save(tmp_path / folder)

    tile = lvit_folder / "img" / "case_0.png"
    assert bench_companion(str(saved("plain")), tile) == {}
    result = bench_companion(str(saved("paired", companion=[4, 8])), tile, repeats=1)
    assert result["infer_model_with_companion_s"] > 0 and result["infer_model_head_only_s"] > 0
    assert result["companion_infer_ratio"] == pytest.approx(
        result["infer_model_with_companion_s"] / result["infer_model_head_only_s"])
    assert "with / without the companion" in table(result)
