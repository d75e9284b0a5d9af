"""Second trainer: adapt the diffusion backbone to the datastore's own (unlabeled) images by DDPM pretraining.

Each run continues the work folder (checkpoints, resumable) and then publishes a new, never-changed version
(``backbones/NNNN``, renamed into place). Heads trained afterwards by the ``textdiff`` trainer use the newest
version (unless ``--conf backbone`` names another) and name it in their config; the model being served keeps its
own backbone version until a head trained on the new one is published.
"""
from __future__ import annotations

import json
import logging

from monailabel.interfaces.tasks.train import TrainTask

from textdiff.model import resolve_model_dir
from textdiff.pretrain import PretrainConfig, pretrain, publish_backbone, published_backbones

from ..security import bounded
from ..settings import AppSettings
from ..transforms import bad_request

logger = logging.getLogger(__name__)


class TextDiffPretrain(TrainTask):
    def __init__(self, settings: AppSettings):
        super().__init__("Pretrain (adapt) the diffusion backbone on every image of the datastore; labels unused")
        self.settings = settings

    @property
    def work(self):
        return self.settings.model_dir.parent / "backbone-work"

    @property
    def versions(self):
        return self.settings.model_dir.parent / "backbones"

    def latest(self):
        """The newest published backbone version, or None."""
        versions = published_backbones(self.versions)
        return versions[-1] if versions else None

    def config(self):
        # start_from "model": adapt the backbone the heads use now (what a campaign wants); "random": from scratch
        return {"minutes": 30.0, "max_steps": 20000, "crop_size": 128, "scale": 1.0, "start_from": "model"}

    def starting_backbone(self, start_from: str) -> str | None:
        if start_from == "random":
            return None
        if start_from != "model":
            raise bad_request(f"start_from must be 'model' or 'random', not {start_from!r}")
        if self.settings.backbone != "default":
            return self.settings.backbone
        served = json.loads((resolve_model_dir(self.settings.initial_model) / "config.json").read_text())
        return served.get("backbone") or "default"

    def __call__(self, request, datastore):
        images = sorted({datastore.get_image_uri(i) for i in datastore.list_images()})
        if not images:
            raise ValueError("the datastore holds no images")
        config = PretrainConfig(images=images, out=str(self.work),
                                size=bounded(request, "crop_size", 128, int, 8, 1024),
                                scale=[bounded(request, "scale", 1.0, float, 0.01, 4.0)],
                                steps=bounded(request, "max_steps", 20000, int, 1, 10_000_000),
                                minutes=bounded(request, "minutes", 30.0, float, 0.0, 7 * 24 * 60),
                                init=self.starting_backbone(str(request.get("start_from", "model"))))
        # resumes from the last checkpoint: a campaign can pretrain in several sittings
        pretrain(config, resume=True, progress=False)
        return {"backbone": str(publish_backbone(self.work, self.versions)), **self.stats()}

    def stats(self):
        latest = self.latest()  # published versions never change: /info/ cannot read a half-written file
        if latest is None:
            return {}
        data = json.loads((latest / "recipe.json").read_text())
        return {"backbone": latest.name} | {k: data[k] for k in ("step", "wall_s", "final") if k in data}
