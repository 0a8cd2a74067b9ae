"""API keys (kept only as SHA-256 hashes, compared in constant time) and a per-key token bucket."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from pathlib import Path

from ayar.errors import AyarError


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: str | None = None, env: str | None = None) -> list[str]:
    """Keys from a file (one per line, `#` comments, raw or `sha256:<hex>`) and/or a comma-separated env var."""
    keys = []
    if path:
        p = Path(path)
        if not p.is_file():
            raise AyarError(f"API key file {path} not found")
        keys += [line.split("#", 1)[0].strip() for line in p.read_text().splitlines()]
    if env and os.environ.get(env):
        keys += os.environ[env].split(",")
    return [k.strip() for k in keys if k.strip()]


class KeyRing:
    def __init__(self, keys: list[str]):
        self.hashes = [k.removeprefix("sha256:").lower() if k.startswith("sha256:") else hash_key(k) for k in keys]
        for h in self.hashes:
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise AyarError("an API key written as sha256:<hex> must have 64 hex digits")

    def __bool__(self) -> bool:
        return bool(self.hashes)

    def check(self, presented: str | None) -> str | None:
        """The key's id (first 12 hex digits of its hash) if `presented` is a known key, else None."""
        if not presented:
            return None
        digest = hash_key(presented)
        found = None
        for h in self.hashes:  # no early exit: the time taken does not tell which key matched
            if hmac.compare_digest(digest, h):
                found = h
        return found[:12] if found else None


class RateLimiter:
    """Token bucket per client: `rate` requests per minute, bursts up to `burst`."""

    def __init__(self, per_minute: float, burst: int):
        self.rate, self.burst = per_minute / 60.0, max(1, burst)
        self.buckets: dict[str, tuple[float, float]] = {}
        self.lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 if the request may go; else seconds until it may."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(client, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self.buckets[client] = (tokens - 1, now)
                return 0.0
            self.buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate
