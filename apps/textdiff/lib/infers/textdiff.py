"""Infer task: image + report -> label map, through MONAI Label's BasicInferTask hook pipeline."""
from __future__ import annotations

import tempfile
import time
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from textdiff.clicks import MAX_CLICKS, parse_clicks
from textdiff.data import write_label

from ..model_store import ModelStore
from ..settings import AppSettings
from ..transforms import bad_request, load_image, resolve_report, stored_report

EXTENSIONS = (".nrrd", ".nii.gz", ".nii", ".png", ".tif", ".mha")


def output_format(data: dict[str, Any], is_volume: bool) -> tuple[str, str]:
    """The label file's extension and dtype asked for in the request, checked."""
    suffix = data.get("result_extension") or (".nrrd" if is_volume else ".png")
    if suffix not in EXTENSIONS:
        raise bad_request(f"result_extension {suffix!r} is not one of {', '.join(EXTENSIONS)}")
    if is_volume and suffix in (".png", ".tif"):
        suffix = ".nrrd"
    dtype = str(data.get("result_dtype") or "uint8")
    if dtype not in ("uint8", "uint16", "int16", "int32", "float32"):
        raise bad_request(f"result_dtype {dtype!r} is not supported")
    return suffix, dtype


class TextDiffInfer(BasicInferTask):
    def __init__(self, store: ModelStore, settings: AppSettings, datastore_getter, description: str):
        super().__init__(path=None, network=None, type=InferType.SEGMENTATION, labels=store.label_names(),
                         dimension=2, description=description, load_strict=False,
                         # free text shown in 3D Slicer's Options table; empty = use the report stored for the image
                         config={"report": ""})
        self.store = store
        self.settings = settings
        self.datastore = datastore_getter

    def is_valid(self) -> bool:
        return self.store.is_available()

    def pre_transforms(self, data=None):
        return [self._load]

    def _load(self, data: dict[str, Any]) -> dict[str, Any]:
        data["image"] = load_image(data["image_path"], self.settings.max_image_pixels)
        windows = self.store.current().work_windows(data["image"])
        if windows > self.settings.max_infer_windows:  # thin or many-sliced images cost more than their pixels say
            raise bad_request(f"this image needs {windows} backbone windows (slices x tiles x test-time variants); "
                              f"the limit is {self.settings.max_infer_windows} (--conf max_infer_windows)")
        data["output_format"] = output_format(data, data["image"].is_volume)  # refused before any inference
        report, source = resolve_report(data.get("report"), stored_report(self.datastore(), data.get("image_id")),
                                        self.settings.max_report_chars)
        data["report"], data["report_source"] = report, source
        return data

    def inferer(self, data=None):
        return None  # run_inferer below drives the engine (sliding windows live there)

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        model = self.store.current()
        started = time.time()
        # "_clicks" is set by the interactive task's _load only: params starting with "_" are refused (security)
        data["pred"] = model.predict(data["image"], data["report"], clicks=data.get("_clicks"))
        data["result"] = {
            "report": data["report"], "report_source": data["report_source"],
            "text_used": data["report"] is not None and model.config.use_text,
            "note": None if data["report"] else "no report given or stored: ran without text",
            "model": self.store.version(), "infer_s": round(time.time() - started, 3),
        }
        return data

    def post_transforms(self, data=None):
        return []

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        suffix, dtype = data["output_format"]  # checked in _load, before the model ran
        path = tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name
        write_label(data["pred"].astype(dtype), data["image"], path)
        return path, data["result"]


class TextDiffInteractive(TextDiffInfer):
    """Correction by clicks and text together (DeepEdit's request format, so Slicer's MONAI Label module shows its
    point tools): the request carries the report and, per label name and ``background``, the annotator's points
    as [column, row] or [column, row, 0] image indices. The model keeps the backbone maps of the images it answered
    last, so a click round on the same image runs only the head."""

    def __init__(self, store: ModelStore, settings: AppSettings, datastore_getter, description: str):
        super().__init__(store, settings, datastore_getter, description)
        self.type = InferType.DEEPEDIT
        self.labels = {"background": 0} | store.label_names()

    def _load(self, data: dict[str, Any]) -> dict[str, Any]:
        data = super()._load(data)
        model = self.store.current()
        image = data["image"]
        # the names Slicer sends (this task's labels) and the served model's: a name the model lacks is a 400
        names = sorted(set(self.labels) | set(model.config.labels))
        strays = sorted(key for key, value in data.items() if key not in names and _looks_like_points(value))
        if strays:  # points under a name no label has would be dropped unseen: the annotator must know
            raise bad_request(f"points under unknown labels {strays[:5]}"[:200] + f"; the labels are {names}")
        points = [{"y": point[1], "x": point[0], "label": name} for name in names
                  for point in _points(data.get(name), name)]
        if points and image.is_volume:
            raise bad_request("clicks are taken on 2D images")
        try:
            data["_clicks"] = parse_clicks(points, model.config.labels, image.size_hw)
        except ValueError as error:
            raise bad_request(f"clicks: {error}") from None
        if model.memory is None:
            model.keep_features(self.settings.click_memory_mb)
        return data


def _looks_like_points(value) -> bool:
    """A non-empty list of [column, row] / [column, row, 0] numbers: what Slicer sends under a label's name."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(p, list) and len(p) in (2, 3) and all(isinstance(c, (int, float)) and not isinstance(c, bool)
                                                         for c in p) for p in value)


def _points(value, name: str) -> list:
    """A label's points from the request: a list of [column, row] or [column, row, 0]; checked by parse_clicks."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_CLICKS:
        raise bad_request(f"{name}: expected a list of at most {MAX_CLICKS} points")
    for point in value:
        if not isinstance(point, list) or len(point) not in (2, 3) or (len(point) == 3 and point[2] not in (0, 0.0)):
            raise bad_request(f"{name}: a point is [column, row] or [column, row, 0], got {point!r}"[:200])
    return value
