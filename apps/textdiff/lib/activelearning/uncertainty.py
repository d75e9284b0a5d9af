"""Uncertainty scoring (mean entropy of the predicted probabilities) and the strategy that uses it."""
from __future__ import annotations

import logging

from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from textdiff.campaign import mean_entropy

from ..model_store import ModelStore
from ..settings import AppSettings
from ..transforms import load_image, stored_report

logger = logging.getLogger(__name__)
SCORE_KEY = "textdiff_uncertainty"
VERSION_KEY = "textdiff_uncertainty_model"


class EntropyScoring(ScoringMethod):
    """Per unlabeled image: mean normalised entropy of the class probabilities; only images not yet scored
    for the current model file are computed."""

    def __init__(self, store: ModelStore, settings: AppSettings):
        super().__init__("Uncertainty: mean entropy of TextDiff's predicted probabilities")
        self.store = store
        self.settings = settings

    def __call__(self, request, datastore):
        version = self.store.version()
        scored, skipped, failed = 0, 0, []
        for image_id in datastore.get_unlabeled_images():
            info = datastore.get_image_info(image_id)
            if info.get(VERSION_KEY) == version:
                skipped += 1
                continue
            try:
                model = self.store.current()
                image = load_image(datastore.get_image_uri(image_id), self.settings.max_image_pixels)
                entropy = mean_entropy(model.predict_image_proba(image, stored_report(datastore, image_id)))
            except Exception as error:  # one bad image must not stop scoring of the others
                logger.warning(f"scoring {image_id} failed: {error}")
                failed.append(image_id)
                continue
            datastore.update_image_info(image_id, {SCORE_KEY: round(entropy, 6), VERSION_KEY: version})
            scored += 1
        return {"scored": scored, "skipped": skipped, "failed": failed, "model": version}


class MostUncertain(Strategy):
    """The unlabeled image with the highest uncertainty score (unscored images come last)."""

    def __init__(self):
        super().__init__("Most uncertain unlabeled image (run the uncertainty scoring first)")

    def __call__(self, request, datastore):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        scores = {i: datastore.get_image_info(i).get(SCORE_KEY) for i in images}
        best = max(sorted(images), key=lambda i: -1.0 if scores[i] is None else float(scores[i]))
        return {"id": best, SCORE_KEY: scores[best]}
