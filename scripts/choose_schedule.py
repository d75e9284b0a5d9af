"""Choose a recipe's step budget without looking at its evaluation set: k-fold cross-validation on the training
images. For each fold the head trains on the other folds with the recipe (and its moving average), validated on the
fold about ten times along the run; the folds' curves are averaged by step and the best step count is printed, to be
written as the recipe's `train_steps` (with `select = "last"`, no selection on the evaluation set is left).

    .venv/bin/python scripts/choose_schedule.py --recipe monuseg --data ../shared/data/monuseg/Train_Folder
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def folds(samples: list, k: int) -> list[list]:
    """k interleaved folds (image i goes to fold i % k): each holds every k-th image of the sorted list."""
    ordered = sorted(samples, key=lambda s: s.name)
    return [ordered[i::k] for i in range(k)]


def fold_curve(recipe: dict, train_part: list, held: list, seed: int, ema: float, cache_dir: str | None) -> dict:
    """{optimizer steps: held-out Dice} along one run of the recipe."""
    from textdiff.model import ModelConfig, TextDiffModel
    from textdiff.train import TrainConfig, train

    model = TextDiffModel.build(ModelConfig(**recipe["model"]), seed=seed)
    config = TrainConfig(**recipe["train"] | {"seed": seed, "ema": ema, "select": "last", "cache_dir": cache_dir})
    with tempfile.TemporaryDirectory() as out:
        summary = train(model, train_part, held, out, config, progress=False)
    steps_per_epoch = math.ceil(summary["windows"] / config.batch_size)
    return {h["epoch"] * steps_per_epoch: h["dice"] for h in summary["history"] if "dice" in h}


def best_steps(curves: list[dict]) -> tuple[int, dict]:
    """The step count with the highest mean Dice over the folds (the curves share their steps when the folds are
    of equal size; a step missing from a curve takes that curve's nearest earlier point)."""
    steps = sorted({s for curve in curves for s in curve})

    def at(curve: dict, step: int) -> float:
        earlier = [s for s in curve if s <= step]
        return curve[max(earlier)] if earlier else curve[min(curve)]

    mean = {s: sum(at(c, s) for c in curves) / len(curves) for s in steps}
    return max(steps, key=lambda s: (mean[s], -s)), mean


def main() -> int:
    from textdiff import recipes
    from textdiff.data import read_lvit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=recipes.DEFAULT)
    parser.add_argument("--data", action="append", required=True, help="LViT folder of the training images")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.99, help="moving-average decay of the runs (default 0.99)")
    parser.add_argument("--cache-dir", default=str(ROOT / "runs" / "feature-cache"))
    parser.add_argument("--out", help="write the curves and the choice as JSON here")
    args = parser.parse_args()
    samples = [s for folder in args.data for s in read_lvit(folder)]
    if not 2 <= args.folds <= len(samples):
        parser.error(f"--folds must be in 2..{len(samples)} (the training images)")
    recipe = recipes.load(args.recipe)
    parts = folds(samples, args.folds)
    curves = []
    for index, held in enumerate(parts):
        train_part = [s for i, part in enumerate(parts) if i != index for s in part]
        curves.append(fold_curve(recipe, train_part, held, args.seed, args.ema, args.cache_dir))
        print(f"fold {index + 1}/{args.folds}: " + ", ".join(f"{s}: {d:.4f}" for s, d in curves[-1].items()),
              flush=True)
    steps, mean = best_steps(curves)
    result = {"recipe": args.recipe, "folds": args.folds, "ema": args.ema, "seed": args.seed,
              "images": len(samples), "mean_dice_by_steps": mean, "best_steps": steps,
              "fold_curves": [{str(s): d for s, d in c.items()} for c in curves]}
    print(f"best: {steps} steps (mean fold Dice {mean[steps]:.4f}) for {len(samples)} images in {args.folds} folds")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
