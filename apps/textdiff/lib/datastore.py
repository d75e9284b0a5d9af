"""The local datastore, refusing labels that do not fit their image (checked before anything is stored)."""
from __future__ import annotations

from monailabel.datastore.local import LocalDatastore

from .transforms import bad_request, check_label


class ValidatingDatastore(LocalDatastore):
    def __init__(self, studies, store, settings, **kwargs):
        self._store, self._settings = store, settings
        super().__init__(studies, **kwargs)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        if image_id not in self._datastore.objects:
            raise bad_request(f"unknown image id {image_id!r}")
        num_classes = max(self._store.label_names().values()) + 1
        check_label(label_filename, self.get_image_uri(image_id), num_classes, self._settings.max_image_pixels)
        return super().save_label(image_id, label_filename, label_tag, label_info)
