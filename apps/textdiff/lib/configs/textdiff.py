"""One TaskConfig for the one model: infer, trainer, scoring and strategies share a ModelStore."""
from __future__ import annotations

from monailabel.interfaces.config import TaskConfig
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from ..activelearning.uncertainty import DiverseUncertain, EntropyScoring, MostUncertain
from ..infers.textdiff import TextDiffInfer, TextDiffInteractive
from ..model_store import ModelStore
from ..settings import AppSettings
from ..trainers.pretrain import TextDiffPretrain
from ..trainers.textdiff import TextDiffTrain


class TextDiffConfig(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict[str, str], planner=None, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.settings: AppSettings = kwargs["settings"]
        self.datastore_getter = kwargs["datastore"]
        self.store = ModelStore(self.settings)  # cheap: nothing heavy loads until the first request

    def infer(self):
        return {self.name: TextDiffInfer(self.store, self.settings, self.datastore_getter,
                                         "TextDiff: segmentation guided by the image's report"),
                f"{self.name}_interactive": TextDiffInteractive(
                    self.store, self.settings, self.datastore_getter,
                    "TextDiff with clicks: correct the label with foreground/background points and the report")}

    def trainer(self):
        return TextDiffTrain(self.store, self.settings, self.pretrainer().latest)

    def pretrainer(self):
        return TextDiffPretrain(self.settings)

    def strategy(self):
        # the first is Slicer's default: random picking led both uncertainty strategies in the simulated campaigns
        # (docs/campaigns.md, `scripts/simulate_campaign.py`)
        return {"random": Random(), f"{self.name}_uncertainty": MostUncertain(),
                f"{self.name}_diverse": DiverseUncertain(), "first": First()}

    def scoring_method(self):
        return {f"{self.name}_uncertainty": EntropyScoring(self.store, self.settings)}
