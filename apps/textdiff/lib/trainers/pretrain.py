"""Second trainer: adapt the diffusion backbone to the datastore's own (unlabeled) images by DDPM pretraining.

Heads trained afterwards by the ``textdiff`` trainer use the adapted backbone (unless ``--conf backbone`` names
another); the model being served keeps its own backbone until a head trained on the new one is published.
"""
from __future__ import annotations

import json
import logging

from monailabel.interfaces.tasks.train import TrainTask

from textdiff.model import resolve_model_dir
from textdiff.pretrain import PretrainConfig, pretrain

from ..settings import AppSettings
from ..transforms import bad_request, request_number

logger = logging.getLogger(__name__)


class TextDiffPretrain(TrainTask):
    def __init__(self, settings: AppSettings):
        super().__init__("Pretrain (adapt) the diffusion backbone on every image of the datastore; labels unused")
        self.settings = settings

    @property
    def out(self):
        return self.settings.model_dir.parent / "backbone"

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
        config = PretrainConfig(images=images, out=str(self.out),
                                size=request_number(request, "crop_size", 128, int, 8),
                                scale=[request_number(request, "scale", 1.0, float, 0.01)],
                                steps=request_number(request, "max_steps", 20000, int, 1),
                                minutes=request_number(request, "minutes", 30.0, float, 0.0),
                                init=self.starting_backbone(str(request.get("start_from", "model"))))
        # resumes from the last checkpoint: a campaign can pretrain in several sittings
        pretrain(config, resume=True, progress=False)
        return {"backbone": str(self.out), **self.stats()}

    def stats(self):
        recipe = self.out / "recipe.json"
        if not recipe.is_file():
            return {}
        data = json.loads(recipe.read_text())
        return {k: data[k] for k in ("step", "wall_s", "final") if k in data}
