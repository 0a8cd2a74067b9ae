"""Local networking helpers shared by the web UI, the serving benchmark and the tests."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for a server or a process group about to be started there)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
