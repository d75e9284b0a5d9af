"""MONAI Label app for TextDiff: report-guided few-shot segmentation on frozen diffusion features."""
from __future__ import annotations

import logging
import os

os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")  # MLflow's file:// tracking fails on monai 1.6
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the embedded defaults need no hub; a hub id fails fast and clearly

import sys
from pathlib import Path

from fastapi import HTTPException
from monailabel.config import settings as server_settings
from monailabel.interfaces.app import MONAILabelApp

from lib import server_guards
from lib.configs.textdiff import TextDiffConfig
from lib.datastore import ValidatingDatastore
from lib.security import bound_host, check_name, exposure
from lib.settings import AppSettings
from textdiff import priority

logger = logging.getLogger(__name__)
MODEL = "textdiff"


class TextDiffApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        # train/scoring subprocesses rebuild this app: they need it importable (MONAI Label reads PYTHONPATH)
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if app_dir not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join(paths + [app_dir])
        # everything the init_* hooks use must exist before MONAILabelApp.__init__ calls them
        self.settings = AppSettings.from_conf(conf, app_dir)
        self.exposure = exposure(bound_host(), server_settings.MONAI_LABEL_AUTH_ENABLE, self.settings.allow_remote)
        if self.settings.heap_tuning:
            from textdiff.accel.heap import reuse_freed_heap

            reuse_freed_heap()
        self.task = TextDiffConfig()
        self.task.init(MODEL, str(self.settings.model_dir), conf, None, settings=self.settings,
                       datastore=lambda: self._datastore)
        if "monailabel.app" in sys.modules:  # the HTTP server (not the train/scoring subprocess, which has none)
            server_guards.install(sys.modules["monailabel.app"].app, self.settings,
                                  loopback_clients_only=self.exposure == "loopback-clients")
        else:  # a training or scoring process: CPU time goes to the annotator's requests first
            if self.settings.background_nice:
                os.nice(max(0, self.settings.background_nice - os.nice(0)))
            if self.settings.background_yield:
                priority.set_yield(self.settings.request_gate().wait)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="TextDiff",
                         description="Report-guided, label-efficient segmentation (TextDiff, MICCAI 2024)",
                         labels=self.task.store.label_names())

    def init_datastore(self):
        return ValidatingDatastore(self.studies, self.task.store, self.settings,
                                   extensions=server_settings.MONAI_LABEL_DATASTORE_FILE_EXT + ["*.tiff", "*.jpeg"],
                                   auto_reload=server_settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                   read_only=server_settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self):
        return self.task.infer()

    def init_trainers(self):
        return {MODEL: self.task.trainer(), f"{MODEL}_pretrain": self.task.pretrainer()}

    def init_strategies(self):
        return self.task.strategy()

    def init_scoring_methods(self):
        return self.task.scoring_method()

    def infer(self, request, datastore=None):
        request = dict(request)
        if request.get("model") not in self._infers:
            raise HTTPException(404, f"unknown model {request.get('model')!r}; available: {', '.join(self._infers)}")
        image = request.get("image")
        store = datastore or self.datastore()
        if not isinstance(image, str):
            raise HTTPException(400, "image must be a datastore id or an uploaded file")
        if request.get("save_label") and request.get("label_tag", "original") != "original":
            # predictions may be kept as "original" (batch infer); the annotator's labels are theirs alone
            raise HTTPException(400, f"inference never writes the {request.get('label_tag')!r} labels")
        upload = Path(image).parent == server_guards.uploads_dir() and Path(image).is_file()
        if not upload:
            check_name(image, "image id")
            if image not in _list_images(store):
                raise HTTPException(404, f"unknown image id {image!r}")
        request["image_id"] = None if upload else image  # the base class swaps the id for a path; reports need the id
        with self.settings.request_gate().held():  # background training/scoring pause meanwhile
            return super().infer(request, datastore)


def _list_images(datastore, attempts: int = 5) -> list[str]:
    """The datastore's file watcher may change its dict while we read it ('dictionary changed size')."""
    for _ in range(attempts - 1):
        try:
            return datastore.list_images()
        except RuntimeError:
            continue
    return datastore.list_images()
