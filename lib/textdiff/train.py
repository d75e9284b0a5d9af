"""Few-shot training of the fusion head on cached frozen features.

The frozen features of every training image at the working scale (in tiles of ``config.tile``, usually the whole
image, and of every image-space augmentation variant) are extracted once and cached in 16 bits, so an epoch only runs
the head, on random windows cut from those feature maps. Cheap feature-space flips/rotations are added on top.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import mmap
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import companion, distributed, preprocess, priority
from .accel.heap import release_free_heap
from .backbone import resolve_precision
from .clicks import click_maps, training_clicks
from .compact import sample_pixels
from .data import Sample, read_image, read_mask
from .head import VARIANTS, rotate_flip
from .metrics import dice_iou
from .model import TextDiffModel, _atomic_write
from .preprocess import tile_layout

# Features take ~16 MB per 256 px tile (a chest X-ray is one tile, a 1000 px H&E image at x0.5 four); without a cap
# every recipe tried keeps its features forever (one development machine reached 57 GB).
DEFAULT_CACHE_MAX_GB = 20.0


@dataclass
class TrainConfig:
    epochs: int = 50
    train_steps: int | None = None  # the run's optimizer steps; set, it decides the epochs (at least one), so that
    # a few labels train as long as many, and validation runs ~10 times (every max(val_every, epochs // 10))
    lr: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    variants: int = 1  # image-space variants extracted per image (1..8); more = better invariance, more extraction
    feature_augment: bool = True
    text_dropout: float = 0.5  # chance a window is trained without its report: keeps the head from memorising
    # images by their (nearly unique) reports, so text is used where it carries information
    lambda_dice: float = 1.5
    ema: float = 0.0  # decay of a moving average of the head's weights (updated every step), which is what is
    # validated and saved; 0 = the weights as trained
    select: str = "best"  # the saved head: "best" validation epoch, or "last" (validation only reports: a choice
    # among epochs on a handful of validation images fits their noise)
    unlabeled_weight: float = 1.0  # of the consistency loss on unlabeled images (when train() is given some): the
    # head learns to predict, under another flip/rotation and without the report half of the time, the confident
    # pixels of its moving average's prediction (mean teacher; needs ema > 0)
    pseudo_threshold: float = 0.9  # teacher probability above which a pixel of an unlabeled window is learned
    companion_steps: int = 3000  # batches of the companion U-Net (a model with config.companion), trained after the
    # head on the same labeled images: from scratch it needs many more steps than a head on frozen features
    cache_dir: str | None = None  # also keep extracted features on disk (16-bit safetensors), reused across runs
    cache_max_gb: float | None = DEFAULT_CACHE_MAX_GB  # least recently used files go beyond this; None = no limit
    cache_bits: int = 16  # 8: features stored as bytes with a scale and offset per channel and tile (half the disk
    # and page cache of 16-bit; turned back into 16-bit values per window as the head reads them)
    val_every: int = 1  # validate every this many epochs (and after the last): runs of many tiny epochs
    # write the training state to out_dir/TRAIN_STATE_NAME after every epoch (removed when the run completes), so a
    # stopped run can continue with resume=True: a 1500-image chest X-ray run is hours of head epochs on a CPU
    checkpoint: bool = False
    resume: bool = False  # continue from out_dir's training state when there is one (same data and options)


class QuantizedMap:
    """A (C, h, w) feature map kept as bytes: value = byte * scale + offset, per channel. Indexing returns the
    16-bit values of the part asked for, so a training window costs its own conversion only."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype):
        self.codes, self.scale, self.offset, self.dtype = codes, scale, offset, dtype  # uint8 (C, h, w); (C,) x2

    @classmethod
    def of(cls, feature: torch.Tensor, dtype: torch.dtype) -> "QuantizedMap":
        f = feature.float()
        low, high = f.amin(dim=(1, 2)), f.amax(dim=(1, 2))
        scale = ((high - low) / 255).clamp_min(1e-12)
        codes = ((f - low[:, None, None]) / scale[:, None, None]).round_().clamp_(0, 255).to(torch.uint8)
        return cls(_channels_last(codes), scale, low, dtype)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dim(self) -> int:
        return self.codes.dim()

    def __getitem__(self, index) -> torch.Tensor:
        codes = self.codes[index]
        view = (-1, 1, 1) if codes.dim() == 3 else (1, -1, 1, 1)
        return (codes.float() * self.scale.view(view) + self.offset.view(view)).to(self.dtype)  # keeps the layout

    def float(self) -> torch.Tensor:
        return self[:].float()


@dataclass
class Tile:
    """Frozen features of one backbone tile (the whole working image when it fits ``config.tile``)."""
    features: list[torch.Tensor | QuantizedMap]  # fp16/bf16 or 8-bit, one (C, h, w) map per block
    mask: torch.Tensor  # (tile_h, tile_w) long, working scale
    report: str | None
    start: tuple[int, int] = (0, 0)  # top-left corner in the working image


def window_box(start: tuple[int, int], size: tuple[int, int], image_hw: tuple[int, int]) -> list[float]:
    """(top, left, bottom, right) of a window as fractions of its working image: where it lies, for the head."""
    (i, j), (h, w), (H, W) = start, size, image_hw
    return [i / H, j / W, (i + h) / H, (j + w) / W]


@dataclass
class CachedImage:
    name: str
    tiles: list[Tile]
    starts: list[tuple[int, int]]
    scaled_size: tuple[int, int]
    truth: np.ndarray  # native-size label map, for validation
    variant: tuple[int, bool] = (0, False)  # how the image was turned/flipped before extraction


def backbone_tiles(model: TextDiffModel, pixels: np.ndarray, variant: int = 0):
    """(tiles, their top-left corners, working size) of one image as the backbone sees it: prepared at the working
    scale, turned/flipped by ``variant``, padded and cut into ``config.tile`` tiles."""
    c = model.config
    x = rotate_flip(model.prepare(pixels), *VARIANTS[variant])
    scaled = tuple(x.shape[-2:])
    padded, sides, starts = tile_layout(scaled, c.window, c.tile, model.features.multiple)
    x = _pad_to(x, padded)
    return [x[:, i:i + sides[0], j:j + sides[1]] for i, j in starts], starts, scaled


def _pad_to(x: torch.Tensor, size_hw: tuple[int, int], value=0) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == tuple(size_hw):
        return x
    return torch.nn.functional.pad(x, (0, size_hw[1] - w, 0, size_hw[0] - h), value=value)


TRIM_EVERY = 16  # images extracted between heap trims: <= ~0.3 GB of growth, ~0.3 % of the extraction time


class FeatureCache:
    """Frozen tile features keyed by image content + everything that shapes them; in memory, optionally on disk.

    Only features are cached: masks and reports are read afresh on every ``get``, so an edited label or report is
    used at once while the expensive part is reused.
    """

    def __init__(self, model: TextDiffModel, cache_dir: str | Path | None = None, batch_size: int = 4,
                 max_gb: float | None = DEFAULT_CACHE_MAX_GB, bits: int = 16):
        self.model = model
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if max_gb is not None and max_gb <= 0:
            raise ValueError(f"feature cache limit must be positive (GB), got {max_gb}")
        self.max_bytes = None if max_gb is None else int(max_gb * 2**30)
        self.batch_size = batch_size
        self.memory: dict[str, tuple[list[list[torch.Tensor]], list[tuple[int, int]], tuple[int, int]]] = {}
        self.extractions = 0  # backbone forwards run (tiles), for tests and reports
        self._extracted_since_trim = 0
        c = model.config
        # 16-bit storage; bf16 where the head runs in bf16, so autocast does not copy the widest maps once more
        self.dtype = torch.bfloat16 if resolve_precision(c.precision, model.device) == "bf16" else torch.float16
        if bits not in (8, 16):
            raise ValueError(f"feature cache bits must be 8 or 16, got {bits}")
        self.bits = bits
        if model.projection is not None and not model.projection.fitted:
            raise ValueError("fit the model's compact projection before caching its features (fit_projection)")
        self.signature = json.dumps([model.config.backbone_fingerprint, c.blocks, c.steps, c.noise_seed, c.window,
                                     c.tile, c.scale, c.precision, c.include_image, str(self.dtype)]
                                    + ([bits] if bits != 16 else [])
                                    + ([model.projection.digest()] if model.projection is not None else []))

    def key(self, sample: Sample, variant: int) -> str:
        digest = hashlib.sha256(self.signature.encode())
        digest.update(Path(sample.image).read_bytes())
        digest.update(str(variant).encode())
        return digest.hexdigest()[:24]

    def get(self, sample: Sample, variant: int = 0, labeled: bool = True, keep: bool = True) -> CachedImage:
        """Features of one image: extracted, or from memory or the cache folder. With a cache folder the features
        are memory-mapped from it, so a feature set larger than RAM trains from the OS page cache. Not ``labeled``:
        the mask is not read (an all-background map stands in). Not ``keep``: a one-pass reader (scoring a pool);
        an extracted entry is not held in memory (its mapped pages would count in RSS and be spared by pruning)."""
        model, c = self.model, self.model.config
        image = read_image(sample.image)
        if image.is_volume:
            raise ValueError(f"{sample.image.name}: training takes 2D images (cut volumes into slices first)")
        truth = read_mask(sample.mask, c.num_classes) if labeled else np.zeros(image.size_hw, np.uint8)
        if truth.shape != image.size_hw:
            raise ValueError(f"{sample.mask.name}: mask size {truth.shape} differs from image size {image.size_hw}")
        key = self.key(sample, variant)
        entry = self.memory.get(key) or (self._load_disk(key) if self.cache_dir else None)
        if entry is None:
            entry = self._extract(image, variant)
            if self.cache_dir:
                try:
                    priority.yield_point()  # writing ~100 MB competes with a request too
                    self._save_disk(key, *entry)
                    entry = self._load_disk(key) or entry  # mapped: RAM holds only the pages in use
                    if keep:
                        self.memory[key] = entry  # before pruning, which spares what this cache holds
                    self.prune()
                except Exception as error:  # a full disk costs the cache, never the training
                    warnings.warn(f"feature cache not written to {self.cache_dir} ({error}); continuing without it")
        if keep:
            self.memory[key] = entry
        features, starts, scaled = entry
        turns, flip = VARIANTS[variant]
        y = rotate_flip(preprocess.prepare_mask(truth, c.scale), turns, flip)[0]
        padded, sides, _ = tile_layout(tuple(y.shape), c.window, c.tile, model.features.multiple)
        y = _pad_to(y, padded)
        tiles = [Tile(f, y[i:i + sides[0], j:j + sides[1]].clone(), sample.report, (i, j))
                 for f, (i, j) in zip(features, starts)]
        return CachedImage(sample.name, tiles, starts, scaled, truth, VARIANTS[variant])

    def _extract(self, image, variant: int):
        model = self.model
        crops, starts, scaled = backbone_tiles(model, image.array, variant)
        features = []
        for b in range(0, len(crops), self.batch_size):
            batch = torch.stack(crops[b:b + self.batch_size]).to(model.device)
            feats = model.backbone_maps(batch)
            self.extractions += batch.shape[0]
            features += [[self._stored(f[k].cpu()) for f in feats] for k in range(batch.shape[0])]
        del feats, batch
        self._extracted_since_trim += 1
        if self._extracted_since_trim >= TRIM_EVERY:
            release_free_heap()
            self._extracted_since_trim = 0
        return features, starts, scaled

    def _stored(self, feature: torch.Tensor) -> torch.Tensor | QuantizedMap:
        if self.bits == 8:
            return QuantizedMap.of(feature, self.dtype)
        return _channels_last(feature.to(self.dtype))

    def _save_disk(self, key: str, features, starts, scaled) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, tile in enumerate(features):
            for b, f in enumerate(tile):
                if isinstance(f, QuantizedMap):
                    tensors |= {f"t{i}.f{b}.scale": f.scale.contiguous(), f"t{i}.f{b}.offset": f.offset.contiguous()}
                    f = f.codes
                tensors[f"t{i}.f{b}"] = f.permute(1, 2, 0).contiguous()
        meta = {"starts": json.dumps(starts), "scaled": json.dumps(scaled), "blocks": str(len(features[0])),
                "layout": "hwc"}
        _atomic_write(self.cache_dir / f"{key}.safetensors", lambda p: save_file(tensors, str(p), metadata=meta))

    def prune(self) -> int:
        """Keep the folder under ``max_gb`` (see ``prune_cache``), never deleting a file this cache has used (a
        mapped file stays readable after deletion on POSIX, but it would be extracted again next run)."""
        if self.cache_dir is None or self.max_bytes is None:
            return 0
        return prune_cache(self.cache_dir, self.max_bytes, keep={f"{key}.safetensors" for key in self.memory})

    def _load_disk(self, key: str):
        path = self.cache_dir / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            os.utime(path)  # "recently used" for pruning is the file's mtime (atime is often not kept)
        except OSError:  # a read-only cache is still usable
            pass
        try:
            tensors, meta = map_safetensors(path)
            starts = [tuple(s) for s in json.loads(meta["starts"])]
            blocks = int(meta["blocks"])
            if meta.get("layout") != "hwc":  # another version's layout: extracted again rather than misread
                return None
            features = [[self._map(tensors, f"t{i}.f{b}") for b in range(blocks)] for i in range(len(starts))]
        except Exception:  # a damaged or foreign cache file is recomputed, never trusted
            return None
        return features, starts, tuple(json.loads(meta["scaled"]))

    def _map(self, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor | QuantizedMap:
        stored = tensors[name].permute(2, 0, 1)
        if stored.dtype != torch.uint8:
            return stored
        return QuantizedMap(stored, tensors[f"{name}.scale"], tensors[f"{name}.offset"], self.dtype)


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I64": torch.int64, "U8": torch.uint8}


CACHE_FILE_NAME = re.compile(r"[0-9a-f]{24}\.safetensors")  # FeatureCache.key + suffix


def prune_cache(folder: str | Path, max_bytes: int, keep: set[str] = frozenset()) -> int:
    """Delete a feature cache folder's least recently used files (mtime; a cache hit refreshes it) until it holds at
    most ``max_bytes``, sparing the file names in ``keep``. Returns the bytes freed."""
    files = []
    for path in Path(folder).glob("*.safetensors"):
        if not CACHE_FILE_NAME.fullmatch(path.name):  # only files this cache wrote: never a model's weights
            continue
        try:
            info = path.stat()
        except FileNotFoundError:  # another process pruned it
            continue
        files.append((info.st_mtime, info.st_size, path))
    total, freed = sum(f[1] for f in files), 0
    for _, size, path in sorted(files):
        if total - freed <= max_bytes:
            break
        if path.name in keep:
            continue
        path.unlink(missing_ok=True)
        freed += size
    return freed


def map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file as views of a private memory map: pages are read when used and
    the OS may drop them again, unlike ``safetensors.torch.load_file``, which reads everything into RAM."""
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: writable, file untouched
    length = int.from_bytes(mapped[:8], "little")
    header = json.loads(mapped[8:8 + length])
    meta = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        flat = (torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + length + start) if count
                else torch.empty(0, dtype=dtype))
        tensors[name] = flat.reshape(info["shape"])
    return tensors, meta


def _channels_last(feature: torch.Tensor) -> torch.Tensor:
    """A (C, h, w) map stored pixel by pixel ((h, w, C) in memory), so crops batch into channels-last maps."""
    return feature.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def stack_windows(maps: list[torch.Tensor]) -> torch.Tensor:
    """(C, h, w) crops -> one (B, C, h, w) channels-last batch: the head's 1x1 maps of the wide cached features
    run ~2.5x faster on it than on (B, C, h, w)-ordered memory (oneDNN), and from pixel-major crops the copy is
    plain."""
    return torch.stack([m.permute(1, 2, 0) for m in maps]).permute(0, 3, 1, 2)


def _covering_count(size_hw, window: int) -> int:
    return math.ceil(size_hw[0] / window) * math.ceil(size_hw[1] / window)


def random_windows(images: list[CachedImage], window: int, strides: list[int], rng: random.Random):
    """One epoch of training windows: about as many random ``window``-sized crops per image as cover it, from its
    tiles in random order, at positions aligned to the coarsest feature stride so every block's map is cut exactly."""
    align = max(strides)
    for image in images:
        order = rng.sample(image.tiles, len(image.tiles))  # every tile once before any twice
        for k in range(_covering_count(image.scaled_size, window)):
            tile = order[k % len(order)]
            h, w = tile.mask.shape
            i = align * rng.randint(0, (h - window) // align)
            j = align * rng.randint(0, (w - window) // align)
            feats = [f[:, i // s:(i + window) // s, j // s:(j + window) // s] for f, s in zip(tile.features, strides)]
            box = window_box((tile.start[0] + i, tile.start[1] + j), (window, window), image.scaled_size)
            yield feats, tile.mask[i:i + window, j:j + window], tile.report, box, image.variant


def _epoch_batches(images: list[CachedImage], window: int, strides: list[int], batch_size: int, steps: int,
                   rng: random.Random):
    """``steps`` batches of random windows; a rank with fewer windows than others draws more of its own."""
    pending: list = []
    for _ in range(steps):
        while len(pending) < batch_size:
            epoch = list(random_windows(images, window, strides, rng))
            rng.shuffle(epoch)
            pending += epoch
        batch, pending = pending[:batch_size], pending[batch_size:]
        yield batch


def cached_probabilities(model: TextDiffModel, image: CachedImage, head: torch.nn.Module | None = None) -> torch.Tensor:
    """(classes, h, w) probabilities at working scale from an image's cached features: only the head (``model.head``
    unless given) runs, on every whole tile, tiles stitched by averaging logits (what inference does, up to the
    blending weights)."""
    return cached_probabilities_many(model, [image], head)[0]


HEAD_BATCH = 8  # tiles per head call when scoring from cached features: a 256 px chest X-ray is one tile, and the
# head's small maps run faster batched


def cached_probabilities_many(model: TextDiffModel, images: list[CachedImage], head: torch.nn.Module | None = None,
                              batch_size: int = HEAD_BATCH) -> list[torch.Tensor]:
    """``cached_probabilities`` of several images, tiles of the same size run through the head together."""
    head = head or model.head
    logits, counts, jobs = [], [], []
    for k, image in enumerate(images):
        height = max(i + t.mask.shape[0] for t, (i, _) in zip(image.tiles, image.starts))
        width = max(j + t.mask.shape[1] for t, (_, j) in zip(image.tiles, image.starts))
        logits.append(torch.zeros(model.config.num_classes, height, width))
        counts.append(torch.zeros(1, height, width))
        jobs += [(k, tile, start) for tile, start in zip(image.tiles, image.starts)]
    by_size: dict[tuple, list] = {}
    for job in jobs:
        by_size.setdefault(tuple(job[1].mask.shape), []).append(job)
    with torch.inference_mode():
        for (th, tw), same in by_size.items():
            for first in range(0, len(same), batch_size):
                priority.yield_point()  # background scoring gives way to requests between head calls
                chunk = same[first:first + batch_size]
                feats = [torch.cat([tile.features[b][None] for _, tile, _ in chunk]).to(model.device)
                         for b in range(len(chunk[0][1].features))]
                tokens, mask = model.text_tokens([tile.report for _, tile, _ in chunk])
                box = torch.tensor([window_box(start, (th, tw), images[k].scaled_size) for k, _, start in chunk])
                out = model.head_logits(feats, tokens, mask, size=(th, tw), box=box,
                                        variants=[images[k].variant for k, _, _ in chunk], head=head).cpu()
                for (k, _, (i, j)), tile_logits in zip(chunk, out):
                    logits[k][:, i:i + th, j:j + tw] += tile_logits
                    counts[k][:, i:i + th, j:j + tw] += 1
    return [torch.softmax(x / n.clamp(min=1), 0)[:, :h, :w]
            for x, n, (h, w) in zip(logits, counts, (image.scaled_size for image in images))]


def validate(model: TextDiffModel, images, head: torch.nn.Module | None = None,
             samples: list[Sample] | None = None) -> dict:
    """Per-image mean Dice/IoU at native size of the head's predictions from cached features. With the images'
    ``samples`` and a companion: the head averaged with it (the companion reads the pixels: it has no cache)."""
    head = head or model.head
    head.eval()
    per_image = {}
    for k, image in enumerate(images):
        probs = cached_probabilities(model, image, head)
        if samples is not None and model.companion is not None:
            x = model.prepare(read_image(samples[k].image).array)[None].to(model.device)
            partner = companion.probabilities(model.companion, x, model.config.window,
                                              precision=model.config.precision)
            probs = model.blend(probs, partner.cpu())
        label = preprocess.label_map(preprocess.resize_to(probs, image.truth.shape)).numpy()
        per_image[image.name] = dice_iou(label, image.truth, model.config.num_classes)
    dice = float(np.mean([d for d, _ in per_image.values()]))
    iou = float(np.mean([i for _, i in per_image.values()]))
    return {"dice": dice, "iou": iou, "n": len(per_image), "per_image": per_image}


TRAIN_STATE_NAME = "training-state.pt"
# TrainConfig fields that may differ between a stopped run and the run that resumes it
_RESUME_FREE = ("cache_dir", "cache_max_gb", "checkpoint", "resume")


def _run_identity(model: TextDiffModel, config: TrainConfig, train_samples, val_samples, world: int) -> str:
    """What a training state belongs to: resuming with other data, options or head would silently mix two runs."""
    options = {k: v for k, v in config.__dict__.items() if k not in _RESUME_FREE}
    recipe = {k: v for k, v in model.config.to_dict().items() if k != "weights"}
    names = [[str(Path(s.image).resolve()) for s in samples] for samples in (train_samples, val_samples or [])]
    blob = json.dumps([options, recipe, names, world], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_train_state(path: Path, identity: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # the RNG state must stay on the CPU
    except Exception as error:  # e.g. a truncated copy: say which file, keep it for the user to look at
        raise ValueError(f"cannot read the training state {path} ({error}); delete it to start over") from None
    if not isinstance(state, dict) or state.get("identity") != identity:
        raise ValueError(f"{path} belongs to a run with other data or options: resume with the same ones, or train "
                         f"without resuming (which starts over and replaces it)")
    return state


def train(model: TextDiffModel, train_samples: list[Sample], val_samples: list[Sample] | None, out_dir: str | Path,
          config: TrainConfig = TrainConfig(), progress: bool = True, cache: FeatureCache | None = None,
          should_stop=None, unlabeled_samples: list[Sample] | None = None) -> dict:
    """Train the head; the best-validation head (or the last, without validation) is saved to ``out_dir``.
    ``should_stop``: polled after every epoch; True ends the run there and saves the best head so far.
    ``unlabeled_samples``: images without labels (their masks are never read) for the consistency loss."""
    if not train_samples:
        raise ValueError("no labeled training images")
    if not 1 <= config.variants <= len(VARIANTS):
        raise ValueError(f"variants must be in 1..{len(VARIANTS)}")
    if config.val_every < 1:
        raise ValueError("val_every must be at least 1")
    if not 0 <= config.ema < 1:
        raise ValueError(f"ema must be in [0, 1), got {config.ema}")
    if config.select not in ("best", "last"):
        raise ValueError(f"select must be 'best' or 'last', got {config.select!r}")
    if model.companion is not None and config.companion_steps < 1:
        raise ValueError("a model with a companion U-Net needs companion_steps >= 1")
    if unlabeled_samples and not config.ema:
        raise ValueError("learning from unlabeled images needs a teacher: set ema (e.g. 0.99)")
    rank, world = distributed.current()  # under torchrun / multi_gpu: images sharded, head in DDP, rank 0 validates
    state_path = Path(out_dir) / TRAIN_STATE_NAME
    identity = (_run_identity(model, config, train_samples, val_samples, world)
                if config.checkpoint or config.resume else None)
    resumed = _read_train_state(state_path, identity) if config.resume else None  # before minutes of extraction
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed + rank)
    started = time.time()
    if model.projection is not None and not model.projection.fitted:
        fit_projection(model, train_samples, config.seed)  # every rank fits the same images: the same projection
    cache = cache or FeatureCache(model, config.cache_dir, config.batch_size, config.cache_max_gb, config.cache_bits)
    progress = progress and rank == 0
    images, val_images = extract_features(cache, train_samples[rank::world], val_samples if rank == 0 else [],
                                          config.variants, progress)
    unlabeled = []
    for sample in tqdm((unlabeled_samples or [])[rank::world], desc="unlabeled", unit="img", disable=not progress):
        try:
            unlabeled.append(cache.get(sample, 0, labeled=False))
        except ValueError as error:  # e.g. a volume in the pool: it teaches nothing, the labeled images still do
            warnings.warn(f"unlabeled image {sample.image.name} skipped: {error}")
    features_s = time.time() - started

    head, trained = model.head, model.head
    n_windows = sum(_covering_count(image.scaled_size, model.config.window) for image in images)
    steps_per_epoch = math.ceil(n_windows / config.batch_size)
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            head, device_ids=[model.device.index] if model.device.type == "cuda" else None)
        steps_per_epoch = int(_all_ranks(torch.distributed.ReduceOp.MAX, steps_per_epoch, model.device))
    total_epochs, val_every = config.epochs, config.val_every
    if config.train_steps is not None:
        total_epochs = max(1, math.ceil(config.train_steps / steps_per_epoch))
        val_every = max(val_every, total_epochs // 10)
    optimizer, scheduler = optimizer_and_schedule(head, config, total_epochs * steps_per_epoch)
    averaged = None
    if config.ema:
        averaged = torch.optim.swa_utils.AveragedModel(
            head, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.ema), use_buffers=True)
    kept = averaged.module if averaged is not None else head  # what is validated and saved
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=1.0, lambda_dice=config.lambda_dice)
    best = {"dice": -1.0, "iou": None, "epoch": 0}
    best_state = None  # set by the first improving epoch (the last epoch always validates)
    history = []
    first_epoch, wall_before = 1, 0.0
    if resumed is not None:
        head.load_state_dict(resumed["head"])
        if averaged is not None:
            averaged.load_state_dict(resumed["averaged"])
        best_state = resumed["best_head"]
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        rng.setstate(resumed["rng"][rank])
        torch.set_rng_state(resumed["torch_rng"])
        best, history = resumed["best"], resumed["history"]
        first_epoch, wall_before = len(history) + 1, float(resumed["wall_s"])
    epochs = tqdm(range(first_epoch, total_epochs + 1), desc="train", unit="epoch", disable=not progress,
                  initial=first_epoch - 1, total=total_epochs)
    stopping = False
    for epoch in epochs:
        epoch_started = time.time()
        loss = train_epoch(model, trained, images, optimizer, scheduler, loss_fn, config, steps_per_epoch, rng,
                           averaged, unlabeled)
        record = {"epoch": epoch, "loss": loss, "train_s": round(time.time() - epoch_started, 2)}
        stopping = should_stop is not None and should_stop()
        if world > 1:  # every rank stops at the same epoch
            stopping = bool(_all_ranks(torch.distributed.ReduceOp.MAX, float(stopping), model.device))
        if val_images and (epoch % val_every == 0 or epoch == total_epochs or stopping):
            record |= {k: v for k, v in validate(model, val_images, kept).items() if k in ("dice", "iou")}
            improved = record["dice"] > best["dice"] or config.select == "last"
        else:
            improved = not val_samples or (config.select == "last" and epoch == total_epochs)
        if world > 1:  # rank 0 decides; the weights are identical on every rank
            flag = torch.tensor([float(improved)], device=model.device)
            torch.distributed.broadcast(flag, 0)
            improved = bool(flag.item())
        if improved:
            best = {"dice": record.get("dice"), "iou": record.get("iou"), "epoch": epoch}  # None without validation
            best_state = copy.deepcopy(kept.state_dict())
        history.append(record)
        postfix = {"loss": f"{record['loss']:.3f}"}
        if "dice" in record:
            postfix |= {"val_dice": f"{record['dice']:.3f}", "best": f"{best['dice']:.3f}"}
        epochs.set_postfix(postfix)
        if config.checkpoint and epoch < total_epochs:
            save_train_state(state_path, rng, world, rank, {
                "identity": identity, "head": head.state_dict(), "best_head": best_state,
                "averaged": averaged.state_dict() if averaged is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), "best": best, "history": history,
                "wall_s": wall_before + time.time() - started})
        if stopping:
            break
    head.load_state_dict(best_state)
    head.eval()
    partner = {}
    if model.companion is not None and rank == 0:
        partner = {"steps": 0} if stopping else train_companion(model, train_samples, config, should_stop,
                                                                       progress)
        if partner["steps"] < config.companion_steps:  # stopped: a half-trained companion would only add noise
            model.companion, model.config.companion = None, None
            partner["dropped"] = "stopped before its training ended: the model is the head alone"
        elif val_images:
            together = validate(model, val_images, samples=val_samples)
            partner |= {"dice": together["dice"], "iou": together["iou"]}
    summary = {"best": best, "epochs": total_epochs, "epochs_run": len(history), "train_images": len(train_samples),
               "world_size": world, "val_images": len(val_images), "unlabeled_images": len(unlabeled_samples or []),
               "windows": n_windows,
               "wall_s": round(wall_before + time.time() - started, 1),  # all parts of a resumed run
               "resumed_at_epoch": first_epoch if first_epoch > 1 else None,
               "features_s": round(features_s, 1), "stopped_early": len(history) < total_epochs,
               "backbone_tiles_extracted": cache.extractions, "config": config.__dict__, "history": history,
               **({"companion": partner} if partner else {})}
    if rank == 0:
        model.save(out_dir, extra=summary)
        if len(history) == total_epochs:  # complete: nothing left to resume
            state_path.unlink(missing_ok=True)
    return summary


def train_companion(model: TextDiffModel, samples: list[Sample], config: TrainConfig, should_stop=None,
                    progress: bool = False) -> dict:
    """Replace ``model.companion`` by one trained from ``config.seed`` on ``samples`` for ``config.companion_steps``
    (every labeled image: it runs on one process). Returns its steps and wall time."""
    c = model.config
    started = time.time()
    model.companion, steps = companion.train_new(
        c.companion, samples, model.features.in_channels, c.num_classes, c.scale, c.window, config.companion_steps,
        config.seed, config.batch_size, model.device, c.precision, should_stop, progress=progress)
    release_free_heap()
    return {"steps": steps, "wall_s": round(time.time() - started, 1)}


PROJECTION_IMAGES = 8  # training images whose backbone maps fit a compact projection


def fit_projection(model: TextDiffModel, samples: list[Sample], seed: int = 0) -> None:
    """Fit ``model.projection`` on pixels sampled from the raw backbone maps of the first ``PROJECTION_IMAGES``
    images (one extra backbone pass over them; the projection is then fixed for the model's life)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = len(model.config.blocks)
    pixels: list[list[torch.Tensor]] = [[] for _ in range(blocks)]
    for sample in samples[:PROJECTION_IMAGES]:
        crops, _, _ = backbone_tiles(model, read_image(sample.image).array)
        for batch in torch.stack(crops).split(4):
            for b, block_pixels in enumerate(sample_pixels(model.features(batch.to(model.device)), blocks, generator)):
                pixels[b].append(block_pixels)
    model.projection.fit([torch.cat(p) for p in pixels])


def extract_features(cache: FeatureCache, samples: list[Sample], val_samples: list[Sample], variants: int,
                     progress: bool) -> tuple[list[CachedImage], list[CachedImage]]:
    """The frozen features of every training image (``variants`` image-space variants each) and validation image."""
    bar = tqdm(total=len(samples) * variants + len(val_samples), desc="features", unit="img", disable=not progress)
    images, val_images = [], []
    for sample in samples:
        for variant in range(variants):
            images.append(cache.get(sample, variant))
            bar.update()
    for sample in val_samples:
        val_images.append(cache.get(sample, 0))
        bar.update()
    bar.close()
    return images, val_images


def optimizer_and_schedule(head: torch.nn.Module, config: TrainConfig, total: int):
    """Adam (one fused kernel instead of ~70 per-parameter updates: ~3 ms less per CPU step), a short linear warm-up
    (1/20 of the ``total`` steps), then cosine decay to 0."""
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, fused=True)
    warmup = max(1, total // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    return optimizer, scheduler


def train_epoch(model: TextDiffModel, trained: torch.nn.Module, images: list[CachedImage], optimizer, scheduler,
                loss_fn, config: TrainConfig, steps: int, rng: random.Random, averaged=None,
                unlabeled: list[CachedImage] = ()) -> float:
    """``steps`` optimizer steps on random windows of the cached features; the mean loss. ``averaged``: a
    ``torch.optim.swa_utils.AveragedModel`` of the head, updated after every step, and the teacher of the
    consistency loss on windows of the ``unlabeled`` images."""
    model.head.train()
    window, strides = model.config.window, model.feature_strides
    pool = _epoch_batches(unlabeled, window, strides, config.batch_size, steps, rng) if unlabeled else None
    losses = []
    for chunk in _epoch_batches(images, window, strides, config.batch_size, steps, rng):
        priority.yield_point()  # a background training gives way to requests between steps
        loss = _window_loss(model, trained, chunk, config, rng, lambda logits, target: loss_fn(logits, target))
        if pool is not None:
            teacher = averaged.module.eval()
            loss = loss + config.unlabeled_weight * _window_loss(
                model, trained, next(pool), config, rng, lambda logits, target: _confident_ce(
                    logits, target, config.pseudo_threshold), teacher=teacher)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if averaged is not None:
            averaged.update_parameters(model.head)
        losses.append(loss.item())
    release_free_heap()  # once per epoch: see release_free_heap
    return float(np.mean(losses))


def _window_loss(model: TextDiffModel, trained, chunk, config: TrainConfig, rng: random.Random, criterion,
                 teacher=None) -> torch.Tensor:
    """The loss of one batch of windows: against their masks, or, given a ``teacher``, against its predicted
    probabilities of the same windows seen unturned and with their reports (the student sees them turned/flipped)."""
    feats = [stack_windows([w[0][k] for w in chunk]).to(model.device) for k in range(len(chunk[0][0]))]
    box = torch.tensor([w[3] for w in chunk])
    variants = [w[4] for w in chunk]
    if teacher is None:
        target = torch.stack([w[1] for w in chunk])[:, None].to(model.device)
    else:
        with torch.no_grad():
            tokens, mask = model.text_tokens([w[2] for w in chunk])
            target = model.head_logits(feats, tokens, mask, head=teacher, box=box, variants=variants).softmax(1)
    dihedral = None
    if config.feature_augment:  # one flip/rotation per batch, applied inside the head (cheaper there)
        dihedral = (rng.randrange(4), rng.random() < 0.5)
        target = rotate_flip(target, *dihedral)
    reports = [None if rng.random() < config.text_dropout else w[2] for w in chunk]
    tokens, mask = model.text_tokens(reports)
    clicks = None
    if model.config.clicks and teacher is None:  # clicks on the head's own errors, as an annotator would place them
        with torch.no_grad():
            guess = model.head_logits(feats, tokens, mask, head=trained, box=box, variants=variants).argmax(1)
        window_hw = tuple(guess.shape[-2:])
        clicks = torch.stack([click_maps(placed, window_hw, model.config.num_classes, model.config.click_radius)
                              for placed in training_clicks(guess, torch.stack([w[1] for w in chunk]), rng)])
    logits = model.head_logits(feats, tokens, mask, head=trained, dihedral=dihedral, box=box, variants=variants,
                               clicks=None if clicks is None else clicks.to(model.device))
    return criterion(logits, target)


def _confident_ce(logits: torch.Tensor, probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Cross-entropy against the teacher's most likely class, over the pixels it is confident of (mean over all
    pixels, so a teacher that is rarely confident weighs little)."""
    confidence, pseudo = probs.max(1)
    per_pixel = torch.nn.functional.cross_entropy(logits, pseudo, reduction="none")
    return (per_pixel * (confidence > threshold)).mean()


def save_train_state(path: Path, rng: random.Random, world: int, rank: int, state: dict) -> None:
    """What ``resume`` continues from, with every rank's window-sampling stream (a resumed DDP run samples as
    before); written by rank 0, atomically."""
    rngs = [rng.getstate()]
    if world > 1:
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, rng.getstate())
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda target: torch.save(state | {"rng": rngs}, target))


def _all_ranks(op, value: float, device) -> float:
    tensor = torch.tensor([float(value)], device=device)
    torch.distributed.all_reduce(tensor, op=op)
    return tensor.item()
