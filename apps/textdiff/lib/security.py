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


def bound_host(argv: list[str] | None = None) -> tuple[str, bool] | None:
    """(address, given explicitly) that ``monailabel start_server`` binds, or None outside start_server. Without
    ``--host`` it binds MONAI Label's default, 0.0.0.0."""
    argv = sys.argv if argv is None else argv
    if "start_server" not in argv:
        return None
    for i, arg in enumerate(argv):
        if arg in ("--host", "-i") and i + 1 < len(argv):
            return argv[i + 1], True
        if arg.startswith("--host="):
            return arg.split("=", 1)[1], True
    return "0.0.0.0", False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure(bound: tuple[str, bool] | None, auth_enabled: bool, allow_remote: bool) -> str:
    """How the server may be reached: "open" (loopback bind, authentication, or the user accepted it),
    "loopback-clients" (MONAI Label's implicit 0.0.0.0 bind: served, but only to this machine). An address the user
    named without authentication refuses to start."""
    if bound is None or is_loopback(bound[0]) or auth_enabled or allow_remote:
        return "open"
    if not bound[1]:
        return "loopback-clients"
    raise RuntimeError(
        f"refusing to serve on {bound[0]}: anyone who reaches it could upload, label and train without logging in. "
        "Bind this machine only (--host 127.0.0.1), turn on MONAI Label authentication (MONAI_LABEL_AUTH_ENABLE=true "
        "with a Keycloak realm), or accept the exposure with --conf allow_remote true")


class LoopbackClientsOnly:
    """ASGI wrapper: HTTP requests from other machines get a 403 that says how to open the server."""

    MESSAGE = (b'{"detail": "this server answers this machine only: start it with MONAI Label authentication '
               b'(MONAI_LABEL_AUTH_ENABLE=true) or --conf allow_remote true to serve other machines"}')

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        client = scope.get("client") or ("", 0)
        if scope["type"] in ("http", "websocket") and not is_loopback(str(client[0])):
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": self.MESSAGE})
            return
        await self.app(scope, receive, send)
