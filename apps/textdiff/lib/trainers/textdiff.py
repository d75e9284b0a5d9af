"""Few-shot trainer: the fusion head on every labeled image of the datastore, published atomically."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from monailabel.interfaces.tasks.train import TrainTask

from textdiff import companion
from textdiff.model import ModelConfig, TextDiffModel, resolve_model_dir
from textdiff.train import TrainConfig, train

from ..model_store import ModelStore
from ..security import bounded
from ..settings import AppSettings
from ..transforms import bad_request, labeled_samples, unlabeled_samples

logger = logging.getLogger(__name__)


class TextDiffTrain(TrainTask):
    def __init__(self, store: ModelStore, settings: AppSettings, adapted_backbone: Callable[[], Path | None]):
        super().__init__("Train the TextDiff fusion head on the labeled images and their reports")
        self.store = store
        self.settings = settings
        self.adapted_backbone = adapted_backbone  # the newest version the textdiff_pretrain trainer published, if any

    @property
    def stop_file(self) -> Path:
        """Written by the server's stop route: the run ends after its current epoch and publishes its best head."""
        return self.settings.model_dir.parent / "train.stop"

    def config(self):
        """The options a client may send (MONAI Label shows them in Slicer); max_epochs 0 = the recipe's budget."""
        return {"max_epochs": self.settings.epochs or 0,
                "learning_rate": self.settings.recipe_section("train").get("lr", TrainConfig.lr), "seed": 0}

    def train_config(self, request: dict) -> TrainConfig:
        """The recipe's training, with the request's epochs, learning rate and seed (each checked)."""
        recipe = self.settings.recipe_section("train")
        epochs = bounded(request, "max_epochs", self.settings.epochs or 0, int, 0, 10_000)
        if epochs:  # epochs asked for replace the recipe's step budget
            recipe = {k: v for k, v in recipe.items() if k != "train_steps"} | {"epochs": epochs}
        return TrainConfig(**recipe | dict(
            lr=bounded(request, "learning_rate", recipe.get("lr", TrainConfig.lr), float, 1e-7, 1.0),
            seed=bounded(request, "seed", 0, int, 0, 2**31 - 1),
            cache_dir=str(self.settings.feature_cache_dir), cache_max_gb=self.settings.feature_cache_gb))

    def new_model_config(self) -> ModelConfig:
        """The initial model's configuration (backbone, blocks, steps, window, scale), the [model] fields of
        ``--conf recipe`` when one is given, then the other --conf overrides; a fresh head."""
        base = json.loads((resolve_model_dir(self.settings.initial_model) / "config.json").read_text())
        config = ModelConfig.from_dict(base)
        labels = {"background": 0} | self.store.label_names()
        # a recipe asked for shapes the head (blocks, scale, tile, ...); its labels are the app's
        recipe = {k: v for k, v in self.settings.recipe_section("model").items() if k != "labels"} \
            if self.settings.recipe else {}
        changes = recipe | dict(labels=labels, feature_channels=None, weights=None, backbone_fingerprint=None,
                                text_encoder=recipe.get("text_encoder", config.text_encoder)
                                if self.settings.text_encoder == "default" else self.settings.text_encoder)
        backbone = self.settings.backbone
        adapted = self.adapted_backbone()
        if backbone == "default" and adapted is not None:
            backbone = str(adapted)
        if backbone != "default" and backbone != config.backbone:
            changes |= dict(backbone=backbone, blocks=None, backbone_fingerprint=None)  # another UNet: its own blocks
        if self.settings.scale is not None:
            changes["scale"] = self.settings.scale
        if self.settings.subpixel is not None:
            changes["subpixel"] = self.settings.subpixel
        if self.settings.clicks:
            changes["clicks"] = True
        if self.settings.companion is not None:
            changes["companion"] = (config.companion or list(companion.WIDTHS)) if self.settings.companion else None
        return dataclasses.replace(config, **changes)

    def __call__(self, request, datastore):
        samples = labeled_samples(datastore)
        if not samples:
            raise bad_request("no labeled images yet: save at least one label before training")
        config = self.train_config(request)
        # a recipe that keeps its last (moving-average) weights needs no validation images: every label trains
        if len(samples) >= 3 and config.select == "best":  # below 3 labels every one is needed for training
            n_val = max(1, round(len(samples) * self.settings.val_fraction))
            train_samples, val_samples = samples[:-n_val], samples[-n_val:]
        else:
            train_samples, val_samples = samples, []
        # the unlabeled pool teaches through the moving average (a recipe without one learns from labels only)
        pool = unlabeled_samples(datastore, self.settings.unlabeled, config.seed) if config.ema else []
        logger.info(f"training on {len(train_samples)} labeled images ({len(pool)} unlabeled), validating on "
                    f"{len(val_samples)}")
        self.stop_file.unlink(missing_ok=True)  # a stop asked for an earlier run
        gpus = torch.cuda.device_count()
        if str(request.get("multi_gpu", "false")).lower() == "true" and gpus > 1:
            # one process per GPU under torch.distributed (NCCL); images sharded, rank 0 validates and publishes
            torch.multiprocessing.spawn(_train_worker, nprocs=gpus, args=(
                gpus, self.new_model_config().to_dict(), train_samples, val_samples, str(self.settings.model_dir),
                config, str(self.stop_file), pool))
            summary = json.loads((self.settings.model_dir / "training.json").read_text())
        else:
            model = self.keep_projection(TextDiffModel.build(self.new_model_config(), self.settings.device,
                                                             seed=config.seed))
            summary = train(model, train_samples, val_samples, self.settings.model_dir, config, progress=False,
                            should_stop=self.stop_file.exists, unlabeled_samples=pool)
        summary.pop("history", None)
        return summary | {"published": str(self.settings.model_dir)}

    def keep_projection(self, model: TextDiffModel) -> TextDiffModel:
        """A compact model takes the served model's projection when it fits (same backbone maps and counts): fitted
        once, so the cached features of the datastore stay valid from one head to the next."""
        if model.projection is None:
            return model
        try:
            served = self.store.current()
        except (FileNotFoundError, ValueError):
            return model
        same = [getattr(served.config, k) == getattr(model.config, k)
                for k in ("backbone_fingerprint", "blocks", "steps", "noise_seed", "compact", "upsampler_input")]
        if served.projection is not None and served.projection.fitted and all(same):
            model.projection.load_state_dict(served.projection.state_dict())
        return model

    def stats(self):
        path = self.settings.model_dir / "training.json"
        if not path.is_file():
            return {}
        data = json.loads(path.read_text())
        return {k: data[k] for k in ("best", "epochs_run", "train_images", "val_images", "unlabeled_images", "wall_s")
                if k in data}


def _train_worker(rank: int, world: int, config: dict, train_samples, val_samples, out_dir: str, train_config,
                  stop_file: str, pool) -> None:
    import os

    from textdiff import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # MONAI Label sets both for its train subprocess
    os.environ.setdefault("MASTER_PORT", "29517")
    _, _, device = distributed.setup()
    model = TextDiffModel.build(ModelConfig.from_dict(config), device, seed=train_config.seed)
    train(model, train_samples, val_samples, out_dir, train_config, progress=False, should_stop=Path(stop_file).exists,
          unlabeled_samples=pool)
    distributed.teardown()
