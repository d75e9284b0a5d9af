"""Simulated annotation campaigns: strategies pick the next images; the loop trains, evaluates, rescores, resumes."""
from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from textdiff.campaign import CampaignConfig, choose, descriptor, mean_entropy, run_campaign
from textdiff.cli import main
from textdiff.data import read_lvit
from textdiff.train import TrainConfig


def test_strategies_pick_the_uncertain_and_the_diverse_picks_no_near_duplicates():
    scores = {"a": 0.9, "b": 0.89, "c": 0.5, "d": 0.1}
    near, far = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    descriptors = {"a": near, "b": near + 0.01, "c": far, "d": far + 0.01, "known": torch.tensor([0.7, 0.7])}
    assert choose("entropy", list(scores), 2, random.Random(0), scores) == ["a", "b"]
    assert choose("diverse", list(scores), 2, random.Random(0), scores, descriptors, ["known"]) == ["a", "c"]
    # what is labeled already counts: an uncertain image next to a labeled one loses to a farther one
    descriptors["known"] = near
    assert choose("diverse", list(scores), 1, random.Random(0), scores, descriptors, ["known"]) == ["c"]
    assert choose("random", list(scores), 2, random.Random(3), scores) == \
        choose("random", list(reversed(scores)), 2, random.Random(3))  # seeded, whatever the order given
    assert choose("entropy", ["a"], 5, random.Random(0), scores) == ["a"]
    with pytest.raises(ValueError, match="unknown strategy"):
        choose("smart", list(scores), 1, random.Random(0), scores)
    assert mean_entropy(torch.full((2, 4, 4), 0.5)) == pytest.approx(1.0)
    assert mean_entropy(torch.stack([torch.ones(4, 4), torch.zeros(4, 4)])) == pytest.approx(0.0, abs=1e-5)


def test_a_campaign_trains_scores_picks_and_resumes(tiny_model, lvit_folder, tmp_path, capsys):
    holdout = tmp_path / "Holdout"
    shutil.copytree(lvit_folder, holdout)
    pool, held = read_lvit(lvit_folder), read_lvit(holdout)
    config = CampaignConfig(strategy="diverse", start=1, batch=1, until=3, round_steps=1)
    train_config = TrainConfig(train_steps=2, cache_dir=str(tmp_path / "cache"))
    record = run_campaign(tiny_model, pool, held, tmp_path / "run", config, train_config, progress=False)
    assert [r["labels"] for r in record["rounds"]] == [1, 2, 3]
    assert sorted(record["labeled"]) == sorted(s.name for s in pool)
    assert all(0.0 <= r["dice"] <= 1.0 for r in record["rounds"])
    assert [r["train_steps"] for r in record["rounds"]] == [2, 1, 1]  # later rounds warm-start with fewer steps
    assert [len(r.get("picked", [])) for r in record["rounds"]] == [1, 1, 0]
    saved = json.loads((tmp_path / "run" / "campaign.json").read_text())
    assert saved["rounds"] == record["rounds"]
    # resumed: a finished campaign returns its record without training again
    stamp = (tmp_path / "run" / "model" / "config.json").stat().st_mtime_ns
    again = run_campaign(tiny_model, pool, held, tmp_path / "run", config, train_config, progress=False)
    assert again["rounds"] == record["rounds"]
    assert (tmp_path / "run" / "model" / "config.json").stat().st_mtime_ns == stamp
    # another campaign's folder is refused; held-out images must not be in the pool
    with pytest.raises(ValueError, match="another campaign"):
        run_campaign(tiny_model, pool, held, tmp_path / "run", CampaignConfig(strategy="random", until=3),
                     train_config, progress=False)
    with pytest.raises(ValueError, match="also in the pool"):
        run_campaign(tiny_model, pool, pool[:1], tmp_path / "other", config, train_config, progress=False)
    with pytest.raises(ValueError, match="until"):
        run_campaign(tiny_model, pool, held, tmp_path / "other", CampaignConfig(until=9), train_config,
                     progress=False)


def test_a_campaign_stopped_between_rounds_goes_on_where_it_stopped(tiny_model, lvit_folder, tmp_path):
    holdout = tmp_path / "Holdout"
    shutil.copytree(lvit_folder, holdout)
    pool, held = read_lvit(lvit_folder), read_lvit(holdout)
    train_config = TrainConfig(train_steps=1, cache_dir=str(tmp_path / "cache"))
    config = CampaignConfig(strategy="entropy", start=1, batch=1, until=3)
    whole = run_campaign(tiny_model, pool, held, tmp_path / "whole", config, train_config, progress=False)
    first = run_campaign(tiny_model, pool, held, tmp_path / "part", CampaignConfig(strategy="entropy", until=1),
                         train_config, progress=False)
    assert [r["labels"] for r in first["rounds"]] == [1]
    # the same campaign, cut after its first round: its record and head are what the longer run starts from
    part = json.loads((tmp_path / "whole" / "campaign.json").read_text())
    part["labeled"], part["rounds"] = part["labeled"][:2], part["rounds"][:1]
    (tmp_path / "whole" / "campaign.json").write_text(json.dumps(part))
    resumed = run_campaign(tiny_model, pool, held, tmp_path / "whole", config, train_config, progress=False)
    assert resumed["labeled"] == whole["labeled"] and [r["labels"] for r in resumed["rounds"]] == [1, 2, 3]


def test_the_campaign_command_prints_dice_per_round(lvit_folder, tiny_unet_dir, tiny_encoder_dir, tmp_path, capsys):
    holdout = tmp_path / "Holdout"
    shutil.copytree(lvit_folder, holdout)
    assert main(["campaign", "--pool", str(lvit_folder), "--holdout", str(holdout), "--out", str(tmp_path / "c"),
                 "--strategy", "entropy", "--start", "1", "--batch", "2", "--until", "3", "--train-steps", "1",
                 "--backbone", str(tiny_unet_dir), "--text-encoder", str(tiny_encoder_dir), "--window", "32",
                 "--head-dim", "16", "--companion-steps", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["strategy"] == "entropy" and [r["labels"] for r in printed["rounds"]] == [1, 3]
    assert (tmp_path / "c" / "feature-cache").is_dir()


def test_the_head_scores_tiles_of_several_images_together_as_it_scores_them_one_by_one(tiny_model, lvit_folder):
    import dataclasses

    from textdiff.train import FeatureCache, cached_probabilities_many

    samples = read_lvit(lvit_folder)
    samples[1] = dataclasses.replace(samples[1], report=None)  # an image without a report among those with one
    images = [FeatureCache(tiny_model).get(s, labeled=False) for s in samples]
    assert all(len(image.tiles) > 1 for image in images)  # a batch mixes tiles of several images
    one_tile_a_call = cached_probabilities_many(tiny_model, images, batch_size=1)
    for batch_size in (3, 8):
        together = cached_probabilities_many(tiny_model, images, batch_size=batch_size)
        for alone, batched in zip(one_tile_a_call, together, strict=True):
            assert batched.shape == alone.shape
            torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(one_tile_a_call[0], one_tile_a_call[2][:, :one_tile_a_call[0].shape[1]])  # not one map


def test_descriptors_are_unit_length_per_block(tiny_model, lvit_folder):
    from textdiff.train import FeatureCache

    image = FeatureCache(tiny_model).get(read_lvit(lvit_folder)[0], labeled=False)
    vector = descriptor(image)
    blocks = len(image.tiles[0].features)
    assert vector.shape[0] == sum(f.shape[0] for f in image.tiles[0].features)
    assert float(vector.norm()) == pytest.approx(blocks ** 0.5, rel=1e-4)


def test_campaign_docs_say_how_many_labels_each_strategy_needs(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("simulate_campaign", root / "scripts" / "simulate_campaign.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "ROOT", tmp_path)
    monkeypatch.setattr(script, "OUT", tmp_path / "docs" / "results" / "campaigns")
    script.OUT.mkdir(parents=True)
    curves = {"random": [0.5, 0.6, 0.7], "entropy": [0.55, 0.7, 0.72], "diverse": [0.5, 0.52, 0.55]}
    for strategy, dice in curves.items():
        for seed in (0, 1):
            rounds = [{"labels": n, "dice": d + 0.01 * seed} for n, d in zip((1, 2, 3), dice)]
            record = {"strategy": strategy, "rounds": rounds, "wall_s": 60.0 * (seed + 1),
                      "machine": {"device": "CPU X", "cores": 2, "precision": "fp32"}}
            (script.OUT / f"monuseg-{strategy}-s{seed}.json").write_text(json.dumps(record))
    script.plots()
    page = (tmp_path / "docs" / "campaigns.md").read_text()
    assert "labels to reach random's 3-label Dice (0.7050)" in page
    assert "| entropy | 2 | 0.5550 | 0.7050 | 0.7250 | 2 (67% of random's) |" in page  # a short curve: every point
    assert "Highest mean Dice over the curve: `entropy` (0.6617;" in page
    assert "entropy reaches random's final Dice with at most 70% of its labels" in page
    assert "One campaign takes 2 min on average (6 campaigns, 2-core CPU X (fp32))" in page
    assert "| diverse | 2 |" in page and "not reached |" in page
    assert (tmp_path / "docs" / "results" / "monuseg_campaign.png").is_file()
    assert "no finished random campaign yet" in page  # COVID-QU-Ex has none


def test_scoring_shards_across_two_torchrun_processes_with_the_same_scores(tiny_model, lvit_folder, tmp_path):
    """`torchrun --nproc_per_node 2 -m textdiff.cli score` (gloo on CPU): each process extracts and scores half the
    images, the first writes them all; the same scores as one process, and a second scoring reads the cache."""
    import os
    import socket
    import subprocess
    import sys

    tiny_model.save(tmp_path / "model")
    args = ["score", "--data", str(lvit_folder), "--model", str(tmp_path / "model")]
    assert main(args + ["--out", str(tmp_path / "one.json"), "--cache-dir", str(tmp_path / "cache1")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["processes"] == 1 and one["images"] == len(read_lvit(lvit_folder)) >= 3
    assert all(0 <= v <= 1 for v in one["entropy"].values())
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "textdiff.cli", *args, "--out", str(tmp_path / "two.json"),
               "--cache-dir", str(tmp_path / "cache2")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["processes"] == 2 and two["entropy"].keys() == one["entropy"].keys()
    for name, value in one["entropy"].items():
        assert abs(two["entropy"][name] - value) < 1e-5, name
    assert len(list((tmp_path / "cache2").glob("*.safetensors"))) == one["images"]  # each image extracted once
    from textdiff.model import TextDiffModel
    from textdiff.train import FeatureCache

    reader = FeatureCache(TextDiffModel.load(tmp_path / "model", "cpu"), tmp_path / "cache2")
    for sample in read_lvit(lvit_folder):  # what the two processes cached is what one process reads back
        reader.get(sample, labeled=False)
    assert reader.extractions == 0


def test_the_pool_benchmark_measures_extraction_cache_size_and_head_only_rescoring(tiny_unet_dir, tiny_encoder_dir,
                                                                                     lvit_folder, tmp_path):
    from textdiff.benchmark import bench_pool, table

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f'[model]\nbackbone = "{tiny_unet_dir}"\ntext_encoder = "{tiny_encoder_dir}"\nwindow = 32\n'
                      'tile = 64\nhead_dim = 16\nprecision = "fp32"\nlabels = ["cell"]\n')
    result = bench_pool(lvit_folder, [1, 3], str(recipe), bits=8)
    small, large = result["pool"]["1"], result["pool"]["3"]
    assert small["images"] == 1 and large["images"] == 3
    assert small["cache_mb_per_image"] > 0 and large["rescore_pool_s"] > 0 and large["peak_rss_gb"] > 0
    assert 0 < large["rescore_first_batch_s"]
    assert "pool of 3: extraction" in table(result)
    with pytest.raises(ValueError, match="pool sizes must be 1..3"):
        bench_pool(lvit_folder, [100], str(recipe))
    with pytest.raises(RuntimeError, match="pool of 1: ValueError: no recipe"):  # a child's error reaches the caller
        bench_pool(lvit_folder, [1], str(tmp_path / "missing.toml"))
