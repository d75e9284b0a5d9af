"""Is the model hub reachable? Asked once before a hub download, so that an offline machine gets the clear error
at once instead of after huggingface_hub's retries (~27 s per file tried), and still loads what its hub cache holds."""
from __future__ import annotations

import socket
from urllib.parse import urlparse


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """None when a TCP connection to the hub endpoint opens within ``timeout`` s; else why it did not."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"{host}:{port} is not reachable ({error})"
    return None


def hub_options() -> tuple[dict, str | None]:
    """``from_pretrained`` keyword arguments for a hub id (cache only when offline) and the offline reason."""
    reason = hub_unreachable_reason()
    return ({"local_files_only": True} if reason else {}), reason
