"""The model the app serves: the last published head if any, else the initial one; shared in the process.

Heavy frozen parts (backbone, report encoder) are loaded lazily on first use and shared through the engine's
process cache, so infer, train and scoring in one process hold them once. A publish (config.json replaced
atomically by the trainer) is picked up on the next request, with no restart.
"""
from __future__ import annotations

import threading
from pathlib import Path

from textdiff.model import CONFIG_NAME, TextDiffModel, resolve_model_dir

from .settings import AppSettings


class ModelStore:
    def __init__(self, settings: AppSettings):
        self.settings = settings
        self._lock = threading.Lock()
        self._model: TextDiffModel | None = None
        self._version: str | None = None

    def source(self) -> Path:
        published = self.settings.model_dir / CONFIG_NAME
        return self.settings.model_dir if published.is_file() else resolve_model_dir(self.settings.initial_model)

    def version(self) -> str:
        """Changes whenever a new model is published (path + config.json mtime)."""
        source = self.source()
        config = source / CONFIG_NAME
        return f"{source}@{config.stat().st_mtime_ns}" if config.is_file() else f"{source}@missing"

    def is_available(self) -> bool:
        return (self.source() / CONFIG_NAME).is_file()

    def current(self) -> TextDiffModel:
        with self._lock:
            version = self.version()
            if self._model is None or version != self._version:
                if not self.is_available():
                    raise FileNotFoundError(f"no model to serve: {self.source()} has no {CONFIG_NAME} "
                                            "(train one, or give --conf model FOLDER)")
                self._model = TextDiffModel.load(self.source(), self.settings.device).use_test_time_variants(
                    self.settings.test_time_variants)
                self._version = version
            return self._model

    def label_names(self) -> dict[str, int]:
        if self.settings.labels:
            return {name: i + 1 for i, name in enumerate(self.settings.labels)}
        try:
            import json

            labels = json.loads((self.source() / CONFIG_NAME).read_text())["labels"]
            return {k: v for k, v in labels.items() if v != 0}
        except (OSError, KeyError, ValueError):
            return {"foreground": 1}
