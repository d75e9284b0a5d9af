"""Simulated annotation campaigns for docs/campaigns.md: held-out Dice against the number of labeled images for each
strategy of `textdiff campaign` (3 seeds), the plot per dataset, and how many labels each strategy needs to reach
random's final Dice.

Each campaign runs in runs/campaigns/<name>/ and resumes there; its record is copied to
docs/results/campaigns/<name>.json when it finishes, and skipped from then on. `--plots` only redraws.

    .venv/bin/python scripts/simulate_campaign.py [--only monuseg] [--seeds 0,1,2] [--plots]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "docs" / "results" / "campaigns"
WORK = ROOT / "runs" / "campaigns"
SEEDS = (0, 1, 2)
STRATEGIES = ("random", "entropy", "diverse")
# pool, held-out set and schedule per dataset; every round after the first warm-starts with `round_steps`
CAMPAIGNS = {
    "monuseg": {"recipe": "monuseg", "pool": ("monuseg/Train_Folder", None), "holdout": ("monuseg/Val_Folder", None),
                "start": 2, "batch": 2, "until": 18, "round_steps": 135},
    "covid": {"recipe": "chest-xray", "pool": ("covid-qu-ex/Train_Folder", slice(0, 1000)),
              "holdout": ("covid-qu-ex/Train_Folder", slice(-200, None)),
              "start": 10, "batch": 10, "until": 200, "round_steps": 1000},
}
NAMES = {"monuseg": "MoNuSeg (pool: Train 24, held out: Val 6)",
         "covid": "COVID-QU-Ex (pool: first 1000 of Train, held out: last 200)"}
TARGET_SHARE = 0.7  # a strategy worth its cost reaches random's final Dice with at most 70 % of random's labels


def samples(dataset: str, which: str):
    from textdiff.data import read_lvit

    folder, part = CAMPAIGNS[dataset][which]
    found = read_lvit(DATA / folder)
    return found[part] if part else found


def run(dataset: str, strategy: str, seed: int) -> dict:
    from textdiff import recipes
    from textdiff.campaign import CampaignConfig, run_campaign
    from textdiff.model import ModelConfig, TextDiffModel
    from textdiff.train import TrainConfig

    spec = CAMPAIGNS[dataset]
    recipe = recipes.load(spec["recipe"])
    name = f"{dataset}-{strategy}-s{seed}"
    config = CampaignConfig(strategy=strategy, start=spec["start"], batch=spec["batch"], until=spec["until"],
                            seed=seed, round_steps=spec["round_steps"])
    train_config = TrainConfig(**recipe["train"] | {"seed": seed, "cache_dir": str(WORK / f"{dataset}-features")})
    # the strategies rank images by the head's own uncertainty: the campaigns run the head alone, without the
    # recipe's companion U-Net (its fixed 3000 steps every round would multiply a campaign's CPU time by ~4)
    model = TextDiffModel.build(ModelConfig(**recipe["model"] | {"companion": None}), seed=seed)
    started = time.time()
    record = run_campaign(model, samples(dataset, "pool"), samples(dataset, "holdout"), WORK / name, config,
                          train_config)
    from reproduce_results import machine

    return record | {"recipe": spec["recipe"], "wall_s": round(time.time() - started, 1), "machine": machine()}


def records(dataset: str) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(OUT.glob(f"{dataset}-*-s*.json"))]


def curves(dataset: str) -> dict[str, dict[int, list[float]]]:
    """strategy -> labels -> held-out Dice of each finished seed."""
    found: dict[str, dict[int, list[float]]] = {}
    for record in records(dataset):
        for round_ in record["rounds"]:
            found.setdefault(record["strategy"], {}).setdefault(round_["labels"], []).append(round_["dice"])
    return found


def labels_to_reach(curve: dict[int, list[float]], target: float) -> int | None:
    """The fewest labels whose mean Dice over seeds reaches ``target``."""
    reached = [n for n, values in sorted(curve.items()) if sum(values) / len(values) >= target]
    return reached[0] if reached else None


def summary_lines(dataset: str, found: dict) -> list[str]:
    if "random" not in found:
        return [f"{NAMES[dataset]}: no finished random campaign yet.", ""]
    final = max(found["random"])
    target = sum(found["random"][final]) / len(found["random"][final])
    points = sorted({n for curve in found.values() for n in curve})
    shown = points if len(points) <= 10 else [n for n in points if n in (points[0], points[-1])
                                              or n % (5 * CAMPAIGNS[dataset]["batch"]) == 0]
    spec = CAMPAIGNS[dataset]
    lines = [f"### {NAMES[dataset]}", "",
             f"{spec['start']} -> {spec['until']} labels, {spec['batch']} per round; the first round trains the "
             f"`{spec['recipe']}` recipe's steps, each later one {spec['round_steps']} steps from the previous head; "
             "the head alone, without a companion U-Net.",
             "", f"![{dataset}](results/{dataset}_campaign.png)", "",
             "| strategy | seeds | " + " | ".join(f"{n} labels" for n in shown) +
             f" | labels to reach random's {final}-label Dice ({target:.4f}) |",
             "|---|---|" + "---|" * len(shown) + "---|"]
    for strategy in STRATEGIES:
        curve = found.get(strategy)
        if not curve:
            continue
        cells = [f"{sum(curve[n]) / len(curve[n]):.4f}" if n in curve else "-" for n in shown]
        needed = labels_to_reach(curve, target)
        share = f"{needed} ({needed / final:.0%} of random's)" if needed else "not reached"
        seeds = min(len(v) for v in curve.values())
        lines.append(f"| {strategy} | {seeds} | " + " | ".join(cells) + f" | {share} |")
    area = {strategy: sum(sum(v) / len(v) for v in curve.values()) / len(curve) for strategy, curve in found.items()}
    best = max(area, key=area.get)
    worth = [s for s in found
             if s != "random" and (labels_to_reach(found[s], target) or math.inf) <= TARGET_SHARE * final]
    lines += ["", f"Highest mean Dice over the curve: `{best}` ({area[best]:.4f}; "
              + ", ".join(f"{s} {v:.4f}" for s, v in area.items() if s != best) + "). "
              + (f"{', '.join(worth)} reach{'es' if len(worth) == 1 else ''} random's final Dice with at most "
                 f"{TARGET_SHARE:.0%} of its labels." if worth else
                 f"No strategy reaches random's final Dice with at most {TARGET_SHARE:.0%} of its labels here.")]
    done = [r for r in records(dataset) if "machine" in r]
    if done:
        where = sorted({f"{r['machine']['cores']}-core {r['machine']['device']} ({r['machine']['precision']})"
                        for r in done})
        minutes = sum(r["wall_s"] for r in done) / len(done) / 60
        lines += ["", f"One campaign takes {minutes:.0f} min on average ({len(done)} campaigns, {', '.join(where)}): "
                      "each round's training, held-out evaluation and scoring of the pool, after the features of "
                      "every image are extracted once."]
    return lines + [""]


def plots() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Annotation campaigns", "",
             "Generated by `scripts/simulate_campaign.py`: each campaign starts from a seeded random set of labeled",
             "images, then each round trains the head (warm-started), evaluates it on the held-out images, scores the",
             "unlabeled pool by the strategy and reveals the ground-truth masks of the images it picks (the oracle",
             "annotator). Strategies: " + ", ".join(f"`{s}`" for s in STRATEGIES) + " (`textdiff campaign --help`).",
             f"A strategy is worth running when it reaches random's final Dice with at most {TARGET_SHARE:.0%} of "
             "random's labels. Run `.venv/bin/python scripts/simulate_campaign.py [--only monuseg]` (resumable; each",
             "finished campaign's record lands in `docs/results/campaigns/`).", ""]
    for dataset in CAMPAIGNS:
        found = curves(dataset)
        lines += summary_lines(dataset, found)
        if not found:
            continue
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for strategy in STRATEGIES:
            if strategy in found:
                xs = sorted(found[strategy])
                ax.plot(xs, [sum(found[strategy][n]) / len(found[strategy][n]) for n in xs], marker="o",
                        label=strategy)
        ax.set_xlabel("labeled images")
        ax.set_ylabel("held-out Dice (mean over seeds)")
        ax.set_title(NAMES[dataset])
        ax.legend()
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "results" / f"{dataset}_campaign.png")
        plt.close(fig)
    (ROOT / "docs" / "campaigns.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only campaigns whose name starts with this (e.g. monuseg)")
    parser.add_argument("--seeds", type=lambda t: tuple(int(v) for v in t.split(",")), default=SEEDS)
    parser.add_argument("--plots", action="store_true", help="only redraw docs/campaigns.md and the plots")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.plots:
        for dataset in CAMPAIGNS:
            for seed in args.seeds:
                for strategy in STRATEGIES:
                    name = f"{dataset}-{strategy}-s{seed}"
                    if (args.only and not name.startswith(args.only)) or (OUT / f"{name}.json").is_file():
                        continue
                    print(f"campaign {name}", flush=True)
                    (OUT / f"{name}.json").write_text(json.dumps(run(dataset, strategy, seed), indent=1))
    plots()
    return 0


if __name__ == "__main__":
    sys.exit(main())
