"""One typed settings object for the app, built from MONAI Label's ``--conf key value`` strings."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from textdiff.data import MAX_PIXELS
from textdiff.model import DEFAULT_HEAD, check_test_time_variants


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


@dataclass(frozen=True)
class AppSettings:
    model_dir: Path  # where trained heads are published (the infer task follows it)
    initial_model: str = DEFAULT_HEAD  # model folder served before the first training
    backbone: str = "default"  # for new heads trained here
    text_encoder: str = "default"
    labels: tuple[str, ...] = ()  # foreground label names; () = those of the initial model
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    epochs: int = 50
    scale: float | None = None  # working scale of new heads; None = the initial model's
    subpixel: bool | None = None  # new heads without a full-resolution stage (faster); None = the initial model's
    max_image_pixels: int = MAX_PIXELS
    max_report_chars: int = 4000
    val_fraction: float = 0.2  # held out for model selection once there are >= 3 labels
    test_time_variants: int | None = None  # flips/rotations averaged by infer and scoring; None = the model's

    # conf key -> (field, parser). Every key is documented in the README.
    KEYS = {
        "model_dir": ("model_dir", Path), "model": ("initial_model", str), "backbone": ("backbone", str),
        "text_encoder": ("text_encoder", str), "labels": ("labels", lambda s: tuple(x.strip() for x in s.split(",") if x.strip())),
        "device": ("device", str), "epochs": ("epochs", int), "scale": ("scale", float),
        "subpixel": ("subpixel", _bool),
        "max_image_pixels": ("max_image_pixels", int), "max_report_chars": ("max_report_chars", int),
        "val_fraction": ("val_fraction", float),
        "test_time_variants": ("test_time_variants", lambda s: check_test_time_variants(int(s))),
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
        if settings.epochs < 1:
            raise ValueError("--conf epochs must be >= 1")
        return settings

    def replace(self, **changes) -> "AppSettings":
        return dataclasses.replace(self, **changes)
