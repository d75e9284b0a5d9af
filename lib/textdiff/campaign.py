"""Annotation campaigns: which unlabeled images to label next (strategies), and a simulated campaign that runs the
loop with an oracle annotator (the ground-truth masks) to measure how many labels a strategy saves.

The simulation uses the engine's own pieces: ``train`` on the labeled images, warm-started from the previous
round's head as the app's trainer is; one feature cache, so that each image's frozen features are extracted once
and scoring and evaluation then run only the head.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .data import Sample
from .model import FeaturePool, TextDiffModel
from .train import (
    HEAD_BATCH,
    CachedImage,
    FeatureCache,
    TrainConfig,
    cached_probabilities_many,
    fit_projection,
    train,
    validate,
)

STRATEGIES = ("random", "entropy", "diverse")
STRATEGY_HELP = ("random: a seeded random choice; entropy: the highest mean entropy of the predicted "
                 "probabilities; diverse: entropy times the distance, in pooled frozen-feature space, to the labeled "
                 "and already chosen images (a batch does not pick near-duplicates)")


@dataclass
class CampaignConfig:
    strategy: str = "entropy"
    start: int = 1  # labeled images before the first round (a seeded random choice, the same for every strategy)
    batch: int = 1  # images labeled per round
    until: int = 18  # stop once this many images are labeled
    seed: int = 0
    round_steps: int | None = None  # optimizer steps per round after the first (warm start); None: the first's


def mean_entropy(probs: torch.Tensor) -> float:
    """Mean per-pixel entropy of (classes, ...) probabilities, normalised to 0..1 by log(classes)."""
    probs = probs.clamp_min(1e-8)
    return float(-(probs * probs.log()).sum(0).mean() / math.log(probs.shape[0]))


def descriptor(image: CachedImage) -> torch.Tensor:
    """An image's place in frozen-feature space, from its cached features (see ``FeaturePool``)."""
    pool = FeaturePool()
    for tile in image.tiles:
        pool.add(tile.features)
    return pool.vector()


def score_pool(model: TextDiffModel, samples: list[Sample], cache: FeatureCache, progress: bool = False) -> dict:
    """Mean entropy of each image's predicted probabilities (the uncertainty the entropy strategy ranks by), from its
    cached features: with a cache folder, rescoring after a new head runs only the head. Under torch.distributed
    (``torchrun``) each rank extracts and scores every world-th image and every rank returns the whole pool's
    scores, sorted by image name."""
    rank, world = distributed.current()
    scores = {}
    mine = samples[rank::world]
    with tqdm(total=len(mine), desc="score", unit="img", disable=not progress or rank != 0) as bar:
        for first in range(0, len(mine), HEAD_BATCH):
            chunk = mine[first:first + HEAD_BATCH]
            images = [cache.get(s, labeled=False, keep=False) for s in chunk]  # one pass: no entry held per image
            for sample, probs in zip(chunk, cached_probabilities_many(model, images)):
                scores[sample.name] = round(mean_entropy(probs), 6)
            bar.update(len(chunk))
    if world > 1:
        parts: list[dict | None] = [None] * world
        torch.distributed.all_gather_object(parts, scores)
        scores = {name: value for part in parts for name, value in part.items()}
    return dict(sorted(scores.items()))


def choose(strategy: str, candidates: list[str], count: int, rng: random.Random, scores: dict[str, float] | None = None,
           descriptors: dict[str, torch.Tensor] | None = None, labeled: list[str] = ()) -> list[str]:
    """The next ``count`` images of ``candidates`` by ``strategy`` (see STRATEGY_HELP)."""
    candidates = sorted(candidates)
    count = min(count, len(candidates))
    if strategy == "random":
        return rng.sample(candidates, count)
    if strategy == "entropy":
        return sorted(candidates, key=lambda name: (-scores[name], name))[:count]
    if strategy != "diverse":
        raise ValueError(f"unknown strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    # uncertainty-weighted k-centre greedy: each pick is far from what is labeled or picked, and uncertain
    vectors = torch.stack([descriptors[name] for name in candidates])
    if labeled:
        known = torch.stack([descriptors[name] for name in labeled])
        distance = torch.cdist(vectors, known).min(dim=1).values
    else:
        distance = torch.ones(len(candidates))
    weight = torch.tensor([scores[name] for name in candidates])
    picked: list[str] = []
    for _ in range(count):
        value = weight * distance
        for name in picked:
            value[candidates.index(name)] = -1.0
        index = int(torch.argmax(value))
        picked.append(candidates[index])
        distance = torch.minimum(distance, torch.cdist(vectors, vectors[index:index + 1])[:, 0])
    return picked


def run_campaign(model: TextDiffModel, pool: list[Sample], holdout: list[Sample], out_dir: str | Path,
                 config: CampaignConfig = CampaignConfig(), train_config: TrainConfig = TrainConfig(),
                 progress: bool = True) -> dict:
    """Simulate a campaign: start from ``config.start`` labeled images of ``pool``; each round train the head,
    evaluate it on ``holdout``, score the unlabeled rest and reveal the masks of the next ``config.batch`` images
    the strategy picks. Writes ``campaign.json`` in ``out_dir`` after every round and resumes from it (the head of
    the last finished round is in ``out_dir/model``). Returns the campaign record."""
    if config.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {config.strategy!r}: one of {', '.join(STRATEGIES)}")
    if not 1 <= config.start <= config.until <= len(pool) or config.batch < 1:
        raise ValueError(f"need 1 <= start ({config.start}) <= until ({config.until}) <= pool size ({len(pool)}) "
                         f"and batch >= 1 ({config.batch})")
    if not holdout:
        raise ValueError("no held-out images to evaluate on")
    names = [s.name for s in pool]
    if len(set(names)) != len(names):
        raise ValueError("pool image names must be unique")
    overlap = {str(Path(s.image).resolve()) for s in pool} & {str(Path(s.image).resolve()) for s in holdout}
    if overlap:
        raise ValueError(f"{len(overlap)} held-out images are also in the pool, e.g. {sorted(overlap)[0]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record_path, model_dir = out_dir / "campaign.json", out_dir / "model"
    identity = _identity(model, pool, holdout, config, train_config)
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record is not None and record.get("identity") != identity:
        raise ValueError(f"{record_path} belongs to another campaign (other data or settings): use another folder")
    if record is not None and record["rounds"]:
        model = TextDiffModel.load(model_dir, model.device)  # the last finished round's head, to warm-start from
    else:
        first = sorted(random.Random(config.seed).sample(names, config.start))
        record = {"identity": identity, "config": dataclasses.asdict(config), "strategy": config.strategy,
                  "pool": len(pool), "holdout": len(holdout), "labeled": first, "rounds": []}
    by_name = {s.name: s for s in pool}
    if model.projection is not None and not model.projection.fitted:  # fitted once: every round's head reads it
        fit_projection(model, sorted(pool, key=lambda s: s.name), train_config.seed)
    cache = FeatureCache(model, train_config.cache_dir, train_config.batch_size, train_config.cache_max_gb,
                         train_config.cache_bits)
    held_out = [cache.get(s) for s in tqdm(holdout, desc="held-out features", unit="img", disable=not progress)]
    while True:
        labeled = record["labeled"]
        if not record["rounds"] or record["rounds"][-1]["labels"] < len(labeled):
            started = time.time()
            steps = train_config.train_steps if not record["rounds"] or config.round_steps is None \
                else config.round_steps
            summary = train(model, [by_name[n] for n in labeled], [], model_dir,
                            dataclasses.replace(train_config, train_steps=steps, select="last", checkpoint=False,
                                                resume=False), progress=False, cache=cache)
            result = validate(model, held_out, samples=holdout)  # a companion U-Net, if any, counts too
            record["rounds"].append({"labels": len(labeled), "dice": result["dice"], "iou": result["iou"],
                                     "train_steps": steps, "epochs": summary["epochs"],
                                     "train_s": round(time.time() - started, 1)})
            _write(record_path, record)
            if progress:
                print(f"{config.strategy}: {len(labeled)} labels, held-out Dice {result['dice']:.4f}",
                      file=sys.stderr, flush=True)
        if len(labeled) >= config.until:
            return record
        started = time.time()
        rest = [n for n in names if n not in labeled]
        scores, descriptors = {}, {}
        if config.strategy != "random":
            model.head.eval()
            names_scored = rest + (labeled if config.strategy == "diverse" else [])
            for first in tqdm(range(0, len(names_scored), HEAD_BATCH), desc="score", unit="batch",
                              disable=not progress):
                chunk = names_scored[first:first + HEAD_BATCH]
                images = [cache.get(by_name[name], labeled=False) for name in chunk]
                unlabeled = [(name, image) for name, image in zip(chunk, images) if name in rest]
                for (name, _), probs in zip(unlabeled, cached_probabilities_many(model, [i for _, i in unlabeled])):
                    scores[name] = mean_entropy(probs)
                if config.strategy == "diverse":
                    descriptors |= {name: descriptor(image) for name, image in zip(chunk, images)}
        rng = random.Random(f"{config.seed}/{len(record['rounds'])}")  # per round: a resumed campaign draws alike
        picked = choose(config.strategy, rest, min(config.batch, config.until - len(labeled)), rng, scores,
                        descriptors, labeled)
        record["labeled"] = labeled + picked
        record["rounds"][-1] |= {"picked": picked, "score_s": round(time.time() - started, 1)}
        _write(record_path, record)


def _identity(model: TextDiffModel, pool, holdout, config: CampaignConfig, train_config: TrainConfig) -> str:
    recipe = {k: v for k, v in model.config.to_dict().items() if k not in ("weights",)}
    options = {k: v for k, v in dataclasses.asdict(train_config).items()
               if k not in ("cache_dir", "cache_max_gb", "checkpoint", "resume")}
    blob = json.dumps([recipe, options, dataclasses.asdict(config), [s.name for s in pool],
                       [s.name for s in holdout]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write(path: Path, record: dict) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(record, indent=1))
    temporary.replace(path)
