"""Responses to deterministic requests (temperature 0, or a fixed seed), bounded in size and age."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict


class ResponseCache:
    def __init__(self, size: int, ttl: float):
        self.size, self.ttl = size, ttl
        self.items: OrderedDict[str, tuple[float, dict]] = OrderedDict()
        self.lock = threading.Lock()

    @staticmethod
    def key(route: str, body: dict) -> str:
        return hashlib.sha256(json.dumps([route, body], sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        with self.lock:
            hit = self.items.get(key)
            if hit is None:
                return None
            if time.monotonic() - hit[0] > self.ttl:
                del self.items[key]
                return None
            self.items.move_to_end(key)
            return hit[1]

    def put(self, key: str, value: dict) -> None:
        if self.size <= 0:
            return
        with self.lock:
            self.items[key] = (time.monotonic(), value)
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
