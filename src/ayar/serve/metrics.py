"""Prometheus metrics of one app (its own registry, so several apps in one process don't collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ayar_requests", "HTTP requests", ["route", "code"], registry=r)
        self.generations = Counter(
            "ayar_generations", "Generation requests by model and A/B variant", ["model", "variant"], registry=r
        )
        self.latency = Histogram("ayar_request_seconds", "Request latency", ["route"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram(
            "ayar_time_to_first_token_seconds", "Time to first token", ["model"], buckets=_LATENCY, registry=r
        )
        self.tokens = Counter("ayar_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.prompt_tokens = Counter("ayar_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.queue = Gauge("ayar_queue_depth", "Rows waiting for a batch", registry=r)
        self.cache = Counter("ayar_cache", "Response cache lookups", ["result"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
