"""What a request may name: ids, tags, file names, infer parameters, and where the datastore may write.

Every check raises ``HTTPException(400)`` with the reason; nothing here touches the disk.
"""
from __future__ import annotations

import ipaddress
import math
import os
import re
import sys
from pathlib import Path

from .transforms import bad_request

# one path component, no leading dot or dash, nothing a shell or a file system treats specially
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
IMAGE_EXTENSIONS = (".nii.gz", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".nii", ".nrrd", ".mha")
LABEL_EXTENSIONS = (".nii.gz", ".png", ".tif", ".tiff", ".nii", ".nrrd", ".mha")
# request keys the server sets itself: a client that sends them could point inference at a server file, store the
# prediction as the annotator's label, or move the work to another device
SERVER_KEYS = frozenset({"image", "image_path", "image_id", "model", "save_label", "label_tag", "label", "label_info",
                         "device", "session", "session_id", "pred", "result", "output_format", "report_source",
                         "logits", "cache_transforms", "latencies", "description", "model_path", "network"})
MAX_PARAMS_BYTES = 64 * 1024


def check_name(value, what: str) -> str:
    """An image id, label tag or file stem: one safe path component (``NAME``), else 400."""
    if not isinstance(value, str) or not NAME.match(value) or ".." in value:
        raise bad_request(f"{what} {str(value)[:80]!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit, no '..'")
    return value


def split_extension(filename: str, allowed: tuple[str, ...], what: str) -> tuple[str, str]:
    """(stem, extension) of an uploaded file's name; only the base name counts and only ``allowed`` extensions."""
    base = os.path.basename(str(filename or "").replace("\\", "/"))
    for extension in allowed:
        if base.lower().endswith(extension) and len(base) > len(extension):
            return base[: -len(extension)], extension
    raise bad_request(f"{what} {base[:80]!r}: the file name must end with one of {', '.join(allowed)}")


def inside(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """``path`` resolved, if it lies inside ``root`` (symbolic links followed); else 400."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise bad_request(f"refused: {Path(path).name!r} would be written outside the studies folder")
    return resolved


def check_infer_params(params: dict) -> dict:
    """Infer ``params`` without the keys the server sets itself (400 naming them)."""
    refused = sorted(k for k in params if k in SERVER_KEYS or k.startswith("_"))
    if refused:
        raise bad_request(f"params may not set {', '.join(refused)}: inference runs on the request's datastore id "
                          "or uploaded file, and never stores labels")
    return params


def bounded(request: dict, key: str, default, kind, low, high):
    """A numeric option from a request: a finite ``kind`` in [low, high], else 400 naming the option."""
    raw = request.get(key, default)
    if isinstance(raw, bool):
        raise bad_request(f"{key} must be a number, not {raw!r}")
    try:
        value = kind(raw)
        if kind is int and isinstance(raw, float) and raw != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise bad_request(f"{key} must be {'an integer' if kind is int else 'a number'}, not {raw!r}") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise bad_request(f"{key} must be a finite number in [{low}, {high}], not {raw!r}")
    return value


def bound_host(argv: list[str] | None = None) -> str | None:
    """The address ``monailabel start_server`` binds (its default 0.0.0.0), or None outside start_server."""
    argv = sys.argv if argv is None else argv
    if "start_server" not in argv:
        return None
    for i, arg in enumerate(argv):
        if arg in ("--host", "-i") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return "0.0.0.0"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str | None, auth_enabled: bool, allow_remote: bool) -> None:
    """Refuse to serve beyond this machine without authentication, unless the user said so."""
    if host is None or is_loopback(host) or auth_enabled or allow_remote:
        return
    raise RuntimeError(
        f"refusing to serve on {host}: anyone who reaches it could upload, label and train without logging in. "
        "Bind this machine only (--host 127.0.0.1), turn on MONAI Label authentication (MONAI_LABEL_AUTH_ENABLE=true "
        "with a Keycloak realm), or accept the exposure with --conf allow_remote true")
