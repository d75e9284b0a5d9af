"""One typed settings object for the app, built from MONAI Label's ``--conf key value`` strings."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from textdiff import recipes
from textdiff.data import MAX_PIXELS
from textdiff.model import DEFAULT_HEAD, MAX_WINDOWS, check_test_time_variants
from textdiff.priority import RequestGate
from textdiff.train import DEFAULT_CACHE_MAX_GB


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _recipe(text: str) -> str:
    recipes.load(text)  # a name or file that does not load is refused at start, not at the first training
    return text


def _origins(text: str) -> tuple[str, ...]:
    """Comma-separated origins (scheme://host[:port]); '*' is refused: the server takes uploads and trains."""
    origins = tuple(o.strip().rstrip("/") for o in str(text).split(",") if o.strip())
    for origin in origins:
        if origin == "*" or not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+$", origin):
            raise ValueError(f"{origin!r} is not an origin like https://viewer.example.org (no wildcard)")
    return origins


@dataclass(frozen=True)
class AppSettings:
    model_dir: Path  # where trained heads are published (the infer task follows it)
    initial_model: str = DEFAULT_HEAD  # model folder served before the first training
    backbone: str = "default"  # for new heads trained here
    text_encoder: str = "default"
    labels: tuple[str, ...] = ()  # foreground label names; () = those of the initial model
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    recipe: str | None = None  # a recipe (textdiff/recipes name or .toml) for new heads: its [model] fields replace
    # the initial model's and its [train] fields are the training; None = the initial model with the default
    # recipe's training
    epochs: int | None = None  # None = the recipe's step budget
    unlabeled: int = 0  # unlabeled datastore images (a seeded random choice) a recipe with a moving average also
    # learns from; 0 = none (each costs a backbone pass per training and its cached features)
    clicks: bool = False  # heads trained here also read annotator clicks (the interactive task needs one)
    background_nice: int = 19  # niceness of training/scoring processes: the annotator's requests go first
    background_yield: bool = True  # training/scoring pause between backbone batches and steps while a request runs
    click_memory_mb: int = 1024  # backbone maps kept for click rounds on recently answered images
    feature_cache_gb: float = DEFAULT_CACHE_MAX_GB  # disk for the datastore images' frozen features (training and
    # scoring share them; the least recently used files go first)
    scale: float | None = None  # working scale of new heads; None = the initial model's
    subpixel: bool | None = None  # new heads without a full-resolution stage (faster); None = the initial model's
    companion: bool | None = None  # new heads with a companion U-Net (better label maps, ~12 more minutes per
    # training on a 2-core CPU); None = as the initial model
    max_image_pixels: int = MAX_PIXELS
    max_report_chars: int = 4000
    val_fraction: float = 0.2  # held out for model selection once there are >= 3 labels
    test_time_variants: int | None = None  # flips/rotations averaged by infer and scoring; None = the model's
    max_infer_windows: int = MAX_WINDOWS  # backbone windows one request may cost (slices x tiles x variants)
    max_upload_mb: int = 1024  # largest uploaded image or label
    cors_origins: tuple[str, ...] = ()  # web pages allowed to call the server from a browser; () = none
    allow_remote: bool = False  # serve a non-loopback address without MONAI Label authentication
    heap_tuning: bool = True  # glibc heap thresholds (textdiff.accel.heap), freed heap given back after each infer

    # conf key -> (field, parser). Every key is documented in the README.
    KEYS = {
        "model_dir": ("model_dir", Path), "model": ("initial_model", str), "backbone": ("backbone", str),
        "text_encoder": ("text_encoder", str),
        "labels": ("labels", lambda s: tuple(x.strip() for x in s.split(",") if x.strip())),
        "device": ("device", str), "epochs": ("epochs", int), "scale": ("scale", float),
        "recipe": ("recipe", _recipe), "unlabeled": ("unlabeled", int), "clicks": ("clicks", _bool),
        "click_memory_mb": ("click_memory_mb", int), "feature_cache_gb": ("feature_cache_gb", float),
        "background_nice": ("background_nice", int),
        "background_yield": ("background_yield", _bool),
        "subpixel": ("subpixel", _bool), "companion": ("companion", _bool),
        "max_image_pixels": ("max_image_pixels", int), "max_report_chars": ("max_report_chars", int),
        "val_fraction": ("val_fraction", float),
        "test_time_variants": ("test_time_variants", lambda s: check_test_time_variants(int(s))),
        "max_infer_windows": ("max_infer_windows", int), "max_upload_mb": ("max_upload_mb", int),
        "cors_origins": ("cors_origins", _origins), "allow_remote": ("allow_remote", _bool),
        "heap_tuning": ("heap_tuning", _bool),
    }
    IGNORED = {"server_mode", "preload", "skip_scoring", "skip_strategies", "skip_trainers"}

    @classmethod
    def from_conf(cls, conf: dict[str, str], app_dir: str | Path) -> "AppSettings":
        values: dict = {"model_dir": Path(app_dir) / "model" / "textdiff"}
        for key, raw in (conf or {}).items():
            if key in cls.IGNORED:
                continue
            if key not in cls.KEYS:
                raise ValueError(f"unknown --conf key {key!r}; known: {', '.join(sorted(cls.KEYS))}")
            name, parse = cls.KEYS[key]
            try:
                values[name] = parse(raw)
            except ValueError as error:
                raise ValueError(f"--conf {key} {raw!r}: {error}") from None
        settings = cls(**values)
        for key in ("epochs", "max_image_pixels", "max_report_chars", "max_infer_windows", "max_upload_mb",
                    "click_memory_mb"):
            if getattr(settings, key) is not None and getattr(settings, key) < 1:
                raise ValueError(f"--conf {key} must be >= 1")
        if not 0 < settings.feature_cache_gb <= 100_000:
            raise ValueError("--conf feature_cache_gb must be in (0, 100000]")
        if not 0 <= settings.unlabeled <= 100_000:
            raise ValueError("--conf unlabeled must be in 0..100000")
        if not 0 <= settings.background_nice <= 19:
            raise ValueError("--conf background_nice must be in 0..19")
        if not 0 <= settings.val_fraction < 1 or (settings.scale is not None and not 0.01 <= settings.scale <= 4):
            raise ValueError("--conf val_fraction must be in [0, 1) and scale in [0.01, 4]")
        return settings

    def recipe_section(self, section: str) -> dict:
        """``[model]`` or ``[train]`` of the recipe new heads follow (``--conf recipe``, else the default's)."""
        return recipes.load(self.recipe or recipes.DEFAULT)[section]

    @property
    def feature_cache_dir(self) -> Path:
        """Frozen features of the datastore's images, shared by training and scoring (beside model_dir)."""
        return self.model_dir.parent / "feature-cache"

    def request_gate(self) -> RequestGate:
        """Shared by the server (held during each inference) and its training/scoring processes (which wait)."""
        return RequestGate(self.model_dir.parent / "requests")

    def replace(self, **changes) -> "AppSettings":
        return dataclasses.replace(self, **changes)
