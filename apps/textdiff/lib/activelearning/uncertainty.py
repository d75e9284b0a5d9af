"""Uncertainty scoring (mean entropy of the predicted probabilities, and where each image lies in frozen-feature
space) and the strategies that use it."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from textdiff.campaign import choose, descriptor, mean_entropy
from textdiff.data import Sample
from textdiff.model import FeaturePool, TextDiffModel
from textdiff.train import HEAD_BATCH, FeatureCache, TrainConfig, cached_probabilities_many

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
    for the current model file are computed. Scores reach the datastore in batches: after the first batch (the
    strategies can answer with the most uncertain image so far) and then every ``SAVE_EVERY_S`` seconds, since each
    write of the index rewrites all of it."""

    SAVE_EVERY_S = 2.0

    def __init__(self, store: ModelStore, settings: AppSettings):
        super().__init__("Uncertainty: mean entropy of TextDiff's predicted probabilities")
        self.store = store
        self.settings = settings
        self._cache: FeatureCache | None = None  # of the model scored last

    def __call__(self, request, datastore):
        version = self.store.version()
        model = self.store.current()
        unlabeled = datastore.get_unlabeled_images()
        todo = [i for i in unlabeled if datastore.get_image_info(i).get(VERSION_KEY) != version]
        skipped = len(unlabeled) - len(todo)
        scored, failed, pending, saved_at = 0, [], {}, None
        for first in range(0, len(todo), HEAD_BATCH):
            for image_id, result in self.score_many(model, datastore, todo[first:first + HEAD_BATCH]).items():
                if isinstance(result, Exception):  # one bad image must not stop scoring of the others
                    logger.warning(f"scoring {image_id} failed: {result}")
                    failed.append(image_id)
                    continue
                entropy, vector = result
                pending[image_id] = {SCORE_KEY: round(entropy, 6), VERSION_KEY: version, FEATURES_KEY: project(vector)}
            if pending and (saved_at is None or time.monotonic() - saved_at >= self.SAVE_EVERY_S
                            or first + HEAD_BATCH >= len(todo)):
                save_infos(datastore, pending)
                scored += len(pending)
                pending, saved_at = {}, time.monotonic()
        return {"scored": scored, "skipped": skipped, "failed": failed, "model": version}

    def score_many(self, model: TextDiffModel, datastore, image_ids: list[str]) -> dict:
        """image id -> (mean entropy, pooled frozen features), or the exception that image raised. A 2D image's
        features come from the feature cache the trainer also uses (beside model_dir): after a new head of the same
        backbone and blocks, rescoring runs the head alone, on several images at once."""
        results, flat = {}, {}
        for image_id in image_ids:
            try:
                path = datastore.get_image_uri(image_id)
                image = load_image(path, self.settings.max_image_pixels)  # size checked before any work
                report = stored_report(datastore, image_id)
                if image.is_volume:
                    pooled = FeaturePool()
                    results[image_id] = (mean_entropy(model.predict_image_proba(image, report, pooled=pooled)),
                                         pooled.vector())
                else:
                    flat[image_id] = self._feature_cache(model).get(Sample(Path(path), None, report), labeled=False,
                                                                    keep=False)
            except Exception as error:
                results[image_id] = error
        try:
            together = cached_probabilities_many(model, list(flat.values())) if flat else []
        except Exception:  # one image the head cannot take must not cost the others their scores
            together = None
        for n, (image_id, cached) in enumerate(flat.items()):
            try:
                probs = together[n] if together is not None else cached_probabilities_many(model, [cached])[0]
                results[image_id] = (mean_entropy(probs), descriptor(cached))
            except Exception as error:
                results[image_id] = error
        return results

    def _feature_cache(self, model: TextDiffModel) -> FeatureCache:
        if self._cache is None or self._cache.model is not model:
            bits = self.settings.recipe_section("train").get("cache_bits", TrainConfig.cache_bits)  # the trainer's
            self._cache = FeatureCache(model, self.settings.feature_cache_dir, bits=bits,
                                       max_gb=self.settings.feature_cache_gb)
        return self._cache


def save_infos(datastore, infos: dict[str, dict]) -> None:
    """Several images' info in one write of the index where the datastore can (the app's own), else one by one."""
    if hasattr(datastore, "update_images_info"):
        datastore.update_images_info(infos)
    else:
        for image_id, info in infos.items():
            datastore.update_image_info(image_id, info)


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
