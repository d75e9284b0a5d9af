"""The local datastore, refusing what does not belong in the studies folder.

Every id and tag is one safe path component and every path it writes or deletes resolves inside the studies
folder; images are decoded before they are stored and labels must fit their image; an existing image is never
replaced by an upload; the index (``datastore_v2.json``, which also holds the reports) is replaced atomically,
so a crash mid-write cannot lose it. These checks sit here, below the endpoints, so that every route is covered.
"""
from __future__ import annotations

import json
import os
import tempfile

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from .security import IMAGE_EXTENSIONS, LABEL_EXTENSIONS, check_name, inside, split_extension
from .transforms import bad_request, check_label, load_image


class ValidatingDatastore(LocalDatastore):
    def __init__(self, studies, store, settings, **kwargs):
        self._store, self._settings = store, settings
        super().__init__(studies, **kwargs)

    def add_image(self, image_id, image_filename, image_info):
        _, extension = split_extension(image_filename, IMAGE_EXTENSIONS, "image file")
        image_id = check_name(image_id or os.path.basename(image_filename)[: -len(extension)], "image id")
        if image_id in self._datastore.objects:
            raise HTTPException(409, f"image {image_id!r} exists already: remove it first (its labels would no "
                                     "longer fit a new image)")
        inside(os.path.join(self._datastore.image_path(), image_id + extension), self._datastore.base_path)
        load_image(image_filename, self._settings.max_image_pixels)  # decoded: a readable image within the limits
        if not isinstance(image_info, dict):
            raise bad_request("image info must be a JSON object")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        check_name(image_id, "image id")
        label_tag = check_name(label_tag or DefaultLabelTag.FINAL.value, "label tag")
        _, extension = split_extension(label_filename, LABEL_EXTENSIONS, "label file")
        if image_id not in self._datastore.objects:
            raise bad_request(f"unknown image id {image_id!r}")
        inside(os.path.join(self._datastore.label_path(label_tag), image_id + extension), self._datastore.base_path)
        num_classes = max(self._store.label_names().values()) + 1
        check_label(label_filename, self.get_image_uri(image_id), num_classes, self._settings.max_image_pixels)
        return super().save_label(image_id, label_filename, label_tag, label_info or {})

    def remove_image(self, image_id):
        check_name(image_id, "image id")
        inside(self.get_image_uri(image_id) or self._datastore.image_path(), self._datastore.base_path)
        return super().remove_image(image_id)

    def remove_label(self, label_id, label_tag):
        check_name(label_id, "label id")
        check_name(label_tag, "label tag")
        uri = self.get_label_uri(label_id, label_tag)
        if not uri:
            raise HTTPException(404, f"no label {label_id!r} with tag {label_tag!r}")
        inside(uri, self._datastore.base_path)
        return super().remove_label(label_id, label_tag)

    def update_image_info(self, image_id, info):
        check_name(image_id, "image id")
        if not isinstance(info, dict):
            raise bad_request("image info must be a JSON object")
        return super().update_image_info(image_id, info)

    def update_images_info(self, infos: dict[str, dict]) -> None:
        """``update_image_info`` of several images with one write of the index (which rewrites all of it)."""
        for image_id, info in infos.items():
            check_name(image_id, "image id")
            if image_id not in self._datastore.objects:
                raise bad_request(f"unknown image id {image_id!r}")
            if not isinstance(info, dict):
                raise bad_request("image info must be a JSON object")
        for image_id, info in infos.items():
            self._datastore.objects[image_id].image.info.update(info)
        self._update_datastore_file()

    def update_label_info(self, label_id, label_tag, info):
        check_name(label_id, "label id")
        check_name(label_tag, "label tag")
        if not isinstance(info, dict):
            raise bad_request("label info must be a JSON object")
        return super().update_label_info(label_id, label_tag, info)

    def _update_datastore_file(self, lock=True):
        if lock:
            from filelock import FileLock

            with FileLock(self._lock_file):
                return self._update_datastore_file(lock=False)
        self._ignore_event_config = True
        path = self._datastore_config_path
        text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
        fd, tmp = tempfile.mkstemp(prefix=".datastore.", suffix=".tmp", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)  # readers see the old index or the new one, never half of one
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._config_ts = os.stat(path).st_mtime
