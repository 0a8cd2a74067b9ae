"""Is the Hugging Face hub reachable? Answered in milliseconds, so offline users get a clear error at once
instead of minutes of connection retries."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    try:
        socket.getaddrinfo(urlparse(constants.ENDPOINT).hostname, 443)
        return True
    except OSError:
        return False
