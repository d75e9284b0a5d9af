"""TextDiffModel: frozen backbone + frozen report encoder + trained head, with native-resolution inference.

A model folder holds ``config.json`` (everything needed to rebuild the model) and the head's weights as safetensors.
``config.json`` names the weights file, and is replaced last (atomically), so a reader never sees a half-written
model.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import companion, preprocess
from .backbone import (
    DEFAULT_BACKBONE,
    DEFAULT_NOISE_SEED,
    DEFAULT_STEPS,
    DiffusionFeatures,
    _autocast,
    load_unet,
    resolve_precision,
)
from .compact import FeatureProjection
from .data import Image
from .head import VARIANTS, FusionHead, rotate_flip, unrotate_flip
from .text import DEFAULT_MAX_TOKENS, DEFAULT_TEXT_ENCODER, ReportEncoder, collate_tokens

logger = logging.getLogger(__name__)
CONFIG_NAME = "config.json"
# backbone windows one inference may cost by default: the work of a square 64-megapixel image at the shipped
# recipe with 8 test-time variants (minutes on a 2-core CPU)
MAX_WINDOWS = 2048
DEFAULT_HEAD = "default"  # the shipped model folder (default backbone + a head trained on MoNuSeg)
SHIPPED_MODEL = Path(__file__).parent / "weights" / "model"
FORMAT = 1  # of config.json and the head's weight names; a model of another format is refused, not converted


def resolve_model_dir(model_dir: str | os.PathLike) -> Path:
    return SHIPPED_MODEL if str(model_dir) == DEFAULT_HEAD else Path(model_dir)


@dataclass
class ModelConfig:
    backbone: str = DEFAULT_BACKBONE
    blocks: list[int] | None = None  # None: the backbone's default_blocks
    steps: list[int] = field(default_factory=lambda: list(DEFAULT_STEPS))
    noise_seed: int = DEFAULT_NOISE_SEED
    include_image: bool = True  # the clean image as one more full-resolution input of the head: exact boundaries
    # at full resolution, which the backbone's maps (finest: half resolution) lack; +0.02-0.03 MoNuSeg Val Dice
    upsampler_input: bool = True  # hooked upsampler units give their input; the head learns the 2x upsampling
    # (same information, 4x smaller cached map, backbone stops earlier; see DiffusionFeatures)
    text_encoder: str = DEFAULT_TEXT_ENCODER
    max_tokens: int = DEFAULT_MAX_TOKENS
    use_text: bool = True
    window: int = 256  # side of the random training windows cut from feature maps, in working-scale pixels
    tile: int = 256  # the backbone sees the working image in tiles of at most this side (one tile when it fits).
    # Larger tiles mean fewer forwards, but the backbone's attention grows with the square of the tile's area
    # (512: ~1.5x slower per pixel on the shipped backbone, and no better on MoNuSeg Val)
    scale: float = 1.0  # working scale: input pixels are resized by this before windows are cut
    overlap: float = 0.0  # of inference tiles; 0 = as few as cover the image (0.25 measured +0.005 MoNuSeg Val
    # Dice for 2.25x the backbone time of a 1000 px tile)
    test_time_variants: int = 1  # dihedral variants of the image whose probabilities inference averages (1 = the
    # image only; 8 = every flip/rotation: +0.008 MoNuSeg Val Dice for 8x the backbone time)
    labels: dict[str, int] = field(default_factory=lambda: {"background": 0, "foreground": 1})
    head_dim: int = 64
    head_heads: int = 4
    position: bool = True  # report attention knows where each token lies in the whole image (see FusionHead)
    text_min_stride: int = 4  # scales at least this coarse attend to the report (1: every scale, as in the paper)
    subpixel: bool = False  # no full-resolution maps in the head: the image folded into 2x2 pixel blocks, 4 pixels
    # per prediction (head epochs ~1.2x faster on CPU; MoNuSeg Val -0.01 Dice)
    image_path: list[int] | None = None  # widths of a trainable U-Net on the clean image joined to the head (a
    # hybrid: with many labels never below a U-Net trained on the same labels); None = the frozen features only
    companion: list[int] | None = None  # widths of a plain U-Net trained on the labeled images beside the head, whose
    # probabilities inference averages with the head's (textdiff.companion); None = the head alone
    companion_weight: float = 0.5  # the companion's share of the averaged probabilities
    clicks: bool = False  # the head also reads annotator clicks: one disk map per class beside the clean image
    click_radius: float = 3.0  # of a click's disk, in working-scale pixels
    compact: list[int] | None = None  # channels kept per hooked block: a fixed projection onto each block's principal
    # directions, fitted on the first training images (textdiff.compact); None = every channel
    precision: str = "auto"
    feature_channels: list[int] | None = None  # filled when the head is built (the backbone's, before compact)
    backbone_fingerprint: str | None = None
    weights: str | None = None  # name of the head's safetensors file inside the model folder

    @property
    def num_classes(self) -> int:
        return max(self.labels.values()) + 1

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        if data.get("format") != FORMAT:
            raise ValueError(f"model config format {data.get('format')!r}: this textdiff reads format {FORMAT} "
                             "(a model saved by another version); train the head again with `textdiff train`")
        known = {f.name for f in dataclasses.fields(cls)} | {"format"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k != "format"})

    def to_dict(self) -> dict:
        return {"format": FORMAT} | dataclasses.asdict(self)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def frozen_backbone(source: str, device: str):
    """Backbones are shared by every model (and by infer, train and scoring) in one process; a folder whose
    weights were rewritten (a resumed pretraining) is loaded afresh."""
    folder = Path(source)
    stamp = max((p.stat().st_mtime_ns for p in folder.glob("*.safetensors")), default=0) if folder.is_dir() else 0
    return _cached_backbone(source, device, stamp)


@functools.lru_cache(maxsize=4)
def _cached_backbone(source: str, device: str, stamp: int):
    # channels-last: oneDNN's convolutions run ~15% faster on CPU without layout reorders
    return load_unet(source).to(device).to(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=4)
def frozen_encoder(source: str, max_tokens: int, device: str) -> ReportEncoder:
    return ReportEncoder.load(source, max_tokens).to(device)


class TextDiffModel(torch.nn.Module):
    def __init__(self, config: ModelConfig, features: DiffusionFeatures, encoder: ReportEncoder | None,
                 head: FusionHead, projection: FeatureProjection | None = None,
                 companion: torch.nn.Module | None = None):
        super().__init__()
        self.config = config
        self.features = features
        self.encoder = encoder
        self.head = head
        self.projection = projection  # config.compact: applied to every backbone map before the head and the caches
        self.companion = companion  # config.companion: a U-Net on the image alone, averaged with the head
        self.memory: FeatureMemory | None = None  # set by keep_features: backbone maps of recent windows

    @functools.cached_property
    def feature_strides(self) -> list[int]:
        """Input size / feature size per hooked block (training cuts windows aligned to the coarsest)."""
        return list(self.features.spec().strides)

    # ----- construction -------------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: ModelConfig, device=None, unet=None, encoder: ReportEncoder | None = None,
              seed: int | None = None):
        """Build with a fresh head; frozen parts are loaded (or shared from the process cache) unless given.
        ``seed``: the head's initialisation (else the global RNG's state, which depends on what ran before)."""
        device = torch.device(device or default_device())

        def features_of(backbone) -> DiffusionFeatures:
            return DiffusionFeatures(backbone, config.blocks, config.steps, config.noise_seed, config.precision,
                                     include_image=config.include_image, upsampler_input=config.upsampler_input)

        features = features_of(unet if unet is not None else frozen_backbone(config.backbone, str(device)))
        fingerprint = features.fingerprint()
        config.blocks = list(features.blocks)
        if (config.image_path or config.clicks) and not config.include_image:
            raise ValueError("image_path and clicks join the clean image: they need include_image")
        check_test_time_variants(config.test_time_variants)
        if config.companion:
            if not 0 < config.companion_weight <= 1:
                raise ValueError(f"companion_weight must be in (0, 1], got {config.companion_weight}")
            if config.window % companion.multiple(config.companion):
                raise ValueError(f"window {config.window} must be divisible by "
                                 f"{companion.multiple(config.companion)} for companion widths {config.companion}")
        for name in ("window", "tile"):
            if getattr(config, name) % features.multiple:
                raise ValueError(f"{name} {getattr(config, name)} must be divisible by {features.multiple} "
                                 "for this backbone")
        if encoder is None:
            encoder = frozen_encoder(config.text_encoder, config.max_tokens, str(device))
        spec = features.spec()
        if config.feature_channels is not None and list(spec.channels) != list(config.feature_channels):
            raise ValueError(f"backbone {config.backbone!r} gives feature channels {list(spec.channels)}, "
                             f"the model was trained with {config.feature_channels}")
        config.feature_channels = list(spec.channels)
        config.backbone_fingerprint = fingerprint
        with torch.random.fork_rng(devices=[], enabled=seed is not None):  # a seed leaves the global RNG alone
            if seed is not None:
                torch.manual_seed(seed)
            head_channels = list(config.feature_channels)
            projection = None
            if config.compact is not None:
                blocks = len(config.blocks)
                projection = FeatureProjection(head_channels[:blocks], list(config.compact)).to(device)
                head_channels[:blocks] = list(config.compact)
            if config.clicks:  # click maps join the clean image, the last input
                head_channels[-1] += config.num_classes
            head = FusionHead(head_channels, encoder.dim, config.num_classes, config.head_dim,
                              config.head_heads, config.use_text, list(spec.strides), config.text_min_stride,
                              upsample=list(spec.upsample), position=config.position,
                              subpixel=config.subpixel, image_path=config.image_path).to(device)
            companion_net = None
            if config.companion:
                companion_net = companion.build(config.companion, features.in_channels, config.num_classes).to(device)
        if config.subpixel and not head.subpixel:  # the config says what the head is, not what was asked
            logger.warning("subpixel: these blocks give no full-resolution scale to fold; the head is the plain one")
            config.subpixel = False
        return cls(config, features, encoder, head, projection, companion_net)

    @classmethod
    def load(cls, model_dir: str | os.PathLike, device=None, unet=None, encoder=None) -> "TextDiffModel":
        model_dir = resolve_model_dir(model_dir)
        config_path = model_dir / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{model_dir} is not a TextDiff model folder (no {CONFIG_NAME})")
        config = ModelConfig.from_dict(json.loads(config_path.read_text()))
        trained_on = config.backbone_fingerprint
        model = cls.build(config, device, unet, encoder)
        if trained_on and trained_on != model.config.backbone_fingerprint:
            # a head on another backbone's features segments nonsense: refuse rather than serve it
            raise ValueError(f"{model_dir}: backbone {model.config.backbone!r} is not the one this head was trained "
                             f"on (fingerprint {model.config.backbone_fingerprint} != {trained_on}); train the head "
                             "again on this backbone, or point the model at the backbone it was trained on")
        state = load_file(str(model_dir / (config.weights or "head.safetensors")))
        try:
            compact = {k.removeprefix("compact."): state.pop(k) for k in list(state) if k.startswith("compact.")}
            if model.projection is not None:
                model.projection.load_state_dict(compact)
            elif compact:
                raise RuntimeError("a projection without compact in the config")
            partner = {k.removeprefix("companion."): state.pop(k) for k in list(state) if k.startswith("companion.")}
            if model.companion is not None:
                model.companion.load_state_dict(partner)
            elif partner:
                raise RuntimeError("companion weights without companion in the config")
            model.head.load_state_dict(state)
        except RuntimeError:
            raise ValueError(f"{model_dir}: its head weights do not fit this version's head layout (trained by an "
                             "older textdiff?); train it again with `textdiff train`") from None
        return model.eval()

    def save(self, model_dir: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write weights under a content-named file, then replace config.json atomically; old weights are removed."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        if self.projection is not None:
            if not self.projection.fitted:
                raise ValueError("the compact projection was never fitted (textdiff.train.fit_projection)")
            state |= {f"compact.{k}": v.detach().cpu().contiguous() for k, v in self.projection.state_dict().items()}
        if self.companion is not None:
            state |= {f"companion.{k}": v.detach().cpu().contiguous() for k, v in self.companion.state_dict().items()}
        digest = hashlib.sha256(b"".join(t.float().numpy().tobytes() for t in state.values())).hexdigest()[:12]
        weights = f"head-{digest}.safetensors"
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # a diverged run (NaN/inf weights) must never replace a working model
            raise ValueError(f"refusing to save a head with non-finite weights ({', '.join(bad[:3])}); "
                             "lower the learning rate")
        _atomic_write(model_dir / weights, lambda p: save_file(state, str(p)))
        self.config.weights = weights
        config_text = json.dumps(self.config.to_dict(), indent=2)
        _atomic_write(model_dir / CONFIG_NAME, lambda p: Path(p).write_text(config_text))
        if extra:
            _atomic_write(model_dir / "training.json", lambda p: Path(p).write_text(json.dumps(extra, indent=2)))
        # keep the previous weights one generation: a reader that read the old config.json can still load them
        heads = sorted(model_dir.glob("head-*.safetensors"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in [h for h in heads if h.name != weights][1:]:
            old.unlink(missing_ok=True)
        return model_dir

    # ----- inference ----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.features.device

    def text_tokens(self, reports: list[str | None]):
        """Padded report tokens for a batch; (None, None) when the model runs without text."""
        if not self.config.use_text or self.encoder is None:
            return None, None
        tokens, mask = collate_tokens([self.encoder.embed(r) for r in reports], self.encoder.dim)
        return tokens.to(self.device), mask.to(self.device)

    def head_logits(self, features: list[torch.Tensor], tokens=None, mask=None, size=None, head=None,
                    dihedral=None, box=None, variants=None, clicks: torch.Tensor | None = None) -> torch.Tensor:
        """Head logits upsampled to the window size (under the model's precision: bf16 halves CPU time).
        ``head`` may be a wrapper of ``self.head`` (DistributedDataParallel while training); ``dihedral`` is a
        training augmentation, ``box`` where each window lies in its image (see ``FusionHead.forward``).
        ``clicks`` (B, classes, h, w): click maps of a model with clicks (None: no clicks)."""
        if self.config.clicks:
            image = features[-1]
            if clicks is None:
                clicks = image.new_zeros(image.shape[0], self.config.num_classes, *image.shape[-2:])
            features = [*features[:-1], torch.cat([image, clicks.to(image.dtype)], dim=1)]
        with _autocast(self.device, resolve_precision(self.config.precision, self.device)):
            logits = (head or self.head)(features, tokens, mask, dihedral, box, variants)
        size = size or self.config.window
        size = (size, size) if isinstance(size, int) else tuple(size)
        if logits.shape[-2:] == size:  # the head already works at window resolution: resizing would be a copy
            return logits.float()
        return torch.nn.functional.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)

    def keep_features(self, max_mb: float | None) -> "TextDiffModel":
        """Keep the backbone maps of the windows inferred last, up to ``max_mb`` (None: keep none), keyed by the
        windows' pixels: a click round on an image seen before then runs only the head."""
        self.memory = FeatureMemory(int(max_mb * 2**20)) if max_mb else None
        return self

    def backbone_maps(self, windows: torch.Tensor) -> list[torch.Tensor]:
        """The frozen maps of a batch of working-scale windows, from ``memory`` when they were kept."""
        if self.memory is None:
            return self._projected(self.features(windows))
        key = hashlib.sha1(windows.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        maps = self.memory.get(key)
        if maps is None:
            maps = self._projected(self.features(windows))
            self.memory.put(key, maps)
        return maps

    def _projected(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return maps if self.projection is None else self.projection(maps)

    def use_test_time_variants(self, count: int | None) -> "TextDiffModel":
        """Average inference over ``count`` flips/rotations from now on (None: keep the model's setting)."""
        if count is not None:
            self.config.test_time_variants = check_test_time_variants(count)
        return self

    def work_windows(self, image: Image) -> int:
        """Backbone windows that predicting ``image`` runs: slices x tiles x test-time variants. Pixels alone miss
        padding: a 2,000,000 x 1 image has 2 MP but needs thousands of tiles."""
        c = self.config
        shape = image.array.shape
        slices, shape = (shape[0], shape[1:3]) if image.is_volume else (1, shape[:2])
        size_hw = tuple(max(1, round(n * c.scale)) for n in shape)
        padded, roi, _ = preprocess.tile_layout(size_hw, c.window, c.tile, self.features.multiple)
        step = [max(1, int(r * (1 - c.overlap))) for r in roi]
        tiles = math.prod(math.ceil(max(p - r, 0) / s) + 1 for p, r, s in zip(padded, roi, step))
        return slices * tiles * c.test_time_variants

    def prepare(self, plane: np.ndarray, value_range=None) -> torch.Tensor:
        return preprocess.prepare(plane, self.features.in_channels, self.config.scale, value_range)

    @torch.inference_mode()
    def predict_proba(self, plane: np.ndarray, report: str | None = None, value_range=None,
                      sw_batch_size: int = 4, pooled: FeaturePool | None = None, clicks=None) -> torch.Tensor:
        """Class probabilities (classes, H, W) of one 2D plane at its native size: the whole working image in one
        forward when it fits ``config.tile``, else overlapping tiles blended with Gaussian weights; averaged over
        ``config.test_time_variants`` flips/rotations of the image. ``pooled`` collects the frozen features' channel
        sums on the way (no extra backbone pass). ``clicks``: ``Click``s in the plane's pixels, which a head trained
        with clicks reads (others ignore them here; ``predict`` turns them into regions)."""
        x = self.prepare(plane, value_range)[None].to(self.device)
        if clicks and self.config.clicks:
            from .clicks import click_maps

            maps = click_maps(clicks, tuple(x.shape[-2:]), self.config.num_classes, self.config.click_radius,
                              x.shape[-2] / plane.shape[0])
            x = torch.cat([x, maps[None].to(x)], dim=1)  # turned and tiled with the image
        tokens, mask = self.text_tokens([report])
        probs = sum(unrotate_flip(self._variant_proba(rotate_flip(x, *variant), tokens, mask, variant, sw_batch_size,
                                                      pooled), *variant)
                    for variant in VARIANTS[:self.config.test_time_variants]) / self.config.test_time_variants
        if self.companion is not None:  # the late ensemble: the U-Net sees the same variants of the image alone
            image = x[:, :self.features.in_channels]
            partner = sum(self._companion_proba(image, variant, sw_batch_size)
                          for variant in VARIANTS[:self.config.test_time_variants]) / self.config.test_time_variants
            probs = self.blend(probs, partner)
        return preprocess.resize_to(probs, plane.shape[:2]).cpu()

    def blend(self, head_probs: torch.Tensor, companion_probs: torch.Tensor) -> torch.Tensor:
        """The late ensemble: the head's and the companion U-Net's probabilities, by ``companion_weight``."""
        weight = self.config.companion_weight
        return (1 - weight) * head_probs + weight * companion_probs

    def _companion_proba(self, image: torch.Tensor, variant, sw_batch_size: int) -> torch.Tensor:
        """The companion's probabilities of the working image turned by ``variant``, turned back; kept in
        ``memory`` like the backbone maps, so a click round on an image seen before runs only the head."""
        x = rotate_flip(image, *variant)
        key = None
        if self.memory is not None:
            key = "companion/" + hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            kept = self.memory.get(key)
            if kept is not None:
                return kept[0]
        probs = unrotate_flip(companion.probabilities(self.companion, x, self.config.window, sw_batch_size,
                                                      self.config.precision), *variant)
        if key is not None:
            self.memory.put(key, [probs])
        return probs

    def _variant_proba(self, x: torch.Tensor, tokens, mask, variant, sw_batch_size: int,
                       pooled: FeaturePool | None = None) -> torch.Tensor:
        """Probabilities of the working image ``x`` (1, C, H, W), which is the original turned/flipped by
        ``variant``: report positions are mapped back to the original (as for training variants)."""
        from monai.inferers import sliding_window_inference

        c = self.config
        size_hw = tuple(x.shape[-2:])
        _, roi, _ = preprocess.tile_layout(size_hw, c.window, c.tile, self.features.multiple)
        # sliding_window_inference pads an image smaller than the window on both sides; positions are in the image
        offset = [max(r - s, 0) // 2 for r, s in zip(roi, size_hw)]

        def predictor(windows: torch.Tensor, where) -> torch.Tensor:
            n = windows.shape[0]
            channels = self.features.in_channels
            clicks = windows[:, channels:] if windows.shape[1] > channels else None
            feats = self.backbone_maps(windows[:, :channels])
            if pooled is not None:
                pooled.add(feats)
            t = tokens.expand(n, -1, -1) if tokens is not None else None
            m = mask.expand(n, -1) if mask is not None else None
            box = torch.tensor([[(w[2].start - offset[0]) / size_hw[0], (w[3].start - offset[1]) / size_hw[1],
                                 (w[2].stop - offset[0]) / size_hw[0], (w[3].stop - offset[1]) / size_hw[1]]
                                for w in where])
            return self.head_logits(feats, t, m, size=windows.shape[-2:], box=box, variants=[variant] * n,
                                    clicks=clicks)

        logits = sliding_window_inference(x, roi, sw_batch_size, predictor, overlap=c.overlap,
                                          mode="gaussian", padding_mode="constant", with_coord=True)
        return torch.softmax(logits[0].float(), dim=0)

    def predict_image_proba(self, image: Image, report: str | None = None, progress=None,
                            pooled: FeaturePool | None = None, clicks=None) -> torch.Tensor:
        """Probabilities (classes, H, W) for 2D, (classes, D, H, W) for volumes (slice by slice, one intensity
        range). ``clicks`` (2D only): see ``predict_proba``."""
        value_range = preprocess.intensity_range(image.array)
        if not image.is_volume:
            return self.predict_proba(image.array, report, value_range, pooled=pooled, clicks=clicks)
        if clicks:
            raise ValueError("clicks are taken on 2D images")
        slices = range(image.array.shape[0])
        return torch.stack([self.predict_proba(image.array[z], report, value_range, pooled=pooled)
                            for z in (progress(slices) if progress else slices)], dim=1)

    def predict(self, image: Image, report: str | None = None, progress=None, clicks=None) -> np.ndarray:
        """Label map of the image's exact size: (H, W) for 2D, (D, H, W) for volumes (slice by slice). ``clicks``
        (2D): the regions they point at take their classes (``textdiff.clicks.correct_regions``)."""
        return self.label_from(self.predict_image_proba(image, report, progress, clicks=clicks), clicks)

    def label_from(self, probs: torch.Tensor, clicks=None) -> np.ndarray:
        """The label map of probabilities, the clicks' regions in their classes (``textdiff.clicks``)."""
        label = preprocess.label_map(probs).numpy().astype(np.uint8)
        if clicks:
            from .clicks import correct_regions

            # the click radius is in working pixels; the label map is at the image's size
            label = correct_regions(label, probs, clicks, self.config.click_radius / self.config.scale)
        return label


class FeatureMemory:
    """Least-recently-used backbone maps of windows, bounded in bytes (thread-safe: inference runs in threads)."""

    def __init__(self, max_bytes: int):
        import collections
        import threading

        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: collections.OrderedDict[str, list[torch.Tensor]] = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> list[torch.Tensor] | None:
        with self.lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        return None

    def put(self, key: str, maps: list[torch.Tensor]) -> None:
        size = sum(m.numel() * m.element_size() for m in maps)
        with self.lock:
            if size > self.max_bytes or key in self.entries:
                return
            self.entries[key] = maps
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self.entries.popitem(last=False)
                self.bytes -= sum(m.numel() * m.element_size() for m in old)


class FeaturePool:
    """Channel sums of frozen feature maps, block by block: where an image lies in feature space (``vector``)."""

    def __init__(self):
        self.sums: list[torch.Tensor] = []
        self.pixels: list[int] = []

    def add(self, feats: list[torch.Tensor]) -> None:
        """Maps of one batch, each (n, C, h, w) or one image's (C, h, w)."""
        for block, f in enumerate(feats):
            f = f if f.dim() == 4 else f[None]
            total, pixels = f.float().sum(dim=(0, 2, 3)).cpu(), f.shape[0] * f.shape[2] * f.shape[3]
            if block == len(self.sums):
                self.sums.append(total)
                self.pixels.append(pixels)
            else:
                self.sums[block] += total
                self.pixels[block] += pixels

    def vector(self) -> torch.Tensor:
        """Each block's mean channel vector at unit length (wide blocks do not dominate), concatenated."""
        return torch.cat([torch.nn.functional.normalize(total / pixels, dim=0)
                          for total, pixels in zip(self.sums, self.pixels)])


def check_test_time_variants(count: int) -> int:
    if not 1 <= count <= len(VARIANTS):
        raise ValueError(f"test-time variants must be in 1..{len(VARIANTS)}, got {count}")
    return count


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
