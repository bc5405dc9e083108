"""Whether the Hugging Face hub can be reached, decided at once (no download retries).

Used before any model or dataset work: a hub id given as ``model.path`` or a benchmark without ``dataset.path``
needs the hub, and ``transformers`` / ``datasets`` would otherwise retry for minutes before failing.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT_S = 3.0


def hub_offline() -> str | None:
    """Why the hub cannot be used (``"HF_HUB_OFFLINE=1"``, ``"huggingface.co is unreachable"``), or None."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable}={os.environ[variable]}"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme != "http" else 80)
    return None if _reachable(host, port) else f"{host} is unreachable (no network)"


@functools.lru_cache(maxsize=8)
def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
