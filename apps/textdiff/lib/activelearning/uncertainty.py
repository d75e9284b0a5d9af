"""Uncertainty scoring (mean entropy of the predicted probabilities, and where each image lies in frozen-feature
space) and the strategies that use it."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from textdiff.campaign import choose, descriptor, mean_entropy
from textdiff.data import Sample
from textdiff.model import FeaturePool, TextDiffModel
from textdiff.train import FeatureCache, TrainConfig, cached_probabilities

from ..model_store import ModelStore
from ..settings import AppSettings
from ..transforms import load_image, stored_report

logger = logging.getLogger(__name__)
SCORE_KEY = "textdiff_uncertainty"
VERSION_KEY = "textdiff_uncertainty_model"
FEATURES_KEY = "textdiff_features"
FEATURE_DIMS = 32  # pooled features are projected to this many numbers: a few hundred bytes per image in the index


def project(vector: torch.Tensor) -> list[float]:
    """A fixed random projection (distances kept up to a small factor) of a pooled-feature vector."""
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(vector.shape[0], FEATURE_DIMS, generator=generator) / FEATURE_DIMS ** 0.5
    return [round(float(v), 4) for v in vector @ matrix]


class EntropyScoring(ScoringMethod):
    """Per unlabeled image: mean normalised entropy of the class probabilities; only images not yet scored
    for the current model file are computed."""

    def __init__(self, store: ModelStore, settings: AppSettings):
        super().__init__("Uncertainty: mean entropy of TextDiff's predicted probabilities")
        self.store = store
        self.settings = settings
        self._cache: FeatureCache | None = None  # of the model scored last

    def __call__(self, request, datastore):
        version = self.store.version()
        scored, skipped, failed = 0, 0, []
        for image_id in datastore.get_unlabeled_images():
            info = datastore.get_image_info(image_id)
            if info.get(VERSION_KEY) == version:
                skipped += 1
                continue
            try:
                entropy, vector = self.score(self.store.current(), datastore, image_id)
            except Exception as error:  # one bad image must not stop scoring of the others
                logger.warning(f"scoring {image_id} failed: {error}")
                failed.append(image_id)
                continue
            datastore.update_image_info(image_id, {SCORE_KEY: round(entropy, 6), VERSION_KEY: version,
                                                   FEATURES_KEY: project(vector)})
            scored += 1
        return {"scored": scored, "skipped": skipped, "failed": failed, "model": version}

    def score(self, model: TextDiffModel, datastore, image_id: str) -> tuple[float, torch.Tensor]:
        """(mean entropy, pooled frozen features) of one image. A 2D image's features come from the feature cache
        the trainer also uses (beside model_dir): after a new head of the same backbone and blocks, rescoring runs
        the head alone."""
        path = datastore.get_image_uri(image_id)
        image = load_image(path, self.settings.max_image_pixels)  # size checked before any work
        report = stored_report(datastore, image_id)
        if image.is_volume:
            pooled = FeaturePool()
            return mean_entropy(model.predict_image_proba(image, report, pooled=pooled)), pooled.vector()
        if self._cache is None or self._cache.model is not model:
            bits = self.settings.recipe_section("train").get("cache_bits", TrainConfig.cache_bits)  # the trainer's
            self._cache = FeatureCache(model, self.settings.feature_cache_dir, bits=bits)
        cached = self._cache.get(Sample(Path(path), None, report), labeled=False, keep=False)
        return mean_entropy(cached_probabilities(model, cached)), descriptor(cached)


class MostUncertain(Strategy):
    """The unlabeled image with the highest uncertainty score (unscored images come last)."""

    def __init__(self, description: str = "Most uncertain unlabeled image (run the uncertainty scoring first)"):
        super().__init__(description)

    def __call__(self, request, datastore):
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        return self.pick(sorted(images), datastore) if images else None

    def pick(self, images: list[str], datastore) -> dict:
        scores = {i: datastore.get_image_info(i).get(SCORE_KEY) for i in images}
        best = max(images, key=lambda i: -1.0 if scores[i] is None else float(scores[i]))
        return {"id": best, SCORE_KEY: scores[best]}


class DiverseUncertain(MostUncertain):
    """The unlabeled image with the highest uncertainty times its distance, in frozen-feature space, to the nearest
    labeled image: uncertain, and unlike what is labeled already (unscored images come last)."""

    def __init__(self):
        super().__init__("Uncertain and unlike the labeled images (run the uncertainty scoring first)")

    def pick(self, images: list[str], datastore) -> dict:
        infos = {i: datastore.get_image_info(i) for i in images}
        scored = [i for i in images if infos[i].get(SCORE_KEY) is not None and infos[i].get(FEATURES_KEY)]
        if not scored:
            return super().pick(images, datastore)
        labeled = [i for i in datastore.get_labeled_images() if datastore.get_image_info(i).get(FEATURES_KEY)]
        vectors = {i: torch.tensor(infos[i][FEATURES_KEY]) for i in scored}
        vectors |= {i: torch.tensor(datastore.get_image_info(i)[FEATURES_KEY]) for i in labeled}
        scores = {i: float(infos[i][SCORE_KEY]) for i in scored}
        best = choose("diverse", scored, 1, None, scores, vectors, labeled)[0]
        return {"id": best, SCORE_KEY: scores[best]}
