"""A/B routing: an alias splits traffic between model versions by weight, sticky per user."""

from __future__ import annotations

import hashlib
import random


def choose(variants: list[tuple[str, float]], sticky: str | None) -> str:
    """The variant for this caller: the same `sticky` key (a user id) always gets the same variant."""
    total = sum(w for _, w in variants)
    point = (int(hashlib.sha256(sticky.encode()).hexdigest()[:12], 16) / 16**12 if sticky else random.random()) * total
    for name, weight in variants:
        point -= weight
        if point < 0:
            return name
    return variants[-1][0]


def parse_alias(text: str) -> tuple[str, list[tuple[str, float]]]:
    """`assistant=v1:0.9,v2:0.1` -> ("assistant", [("v1", 0.9), ("v2", 0.1)])."""
    from ayar.errors import AyarError

    alias, _, rest = text.partition("=")
    try:
        variants = [(name, float(w)) for name, _, w in (part.partition(":") for part in rest.split(","))]
    except ValueError:
        variants = []
    if not alias or not variants or any(w <= 0 or not n for n, w in variants):
        raise AyarError(
            f"--alias {text!r}: write ALIAS=MODEL:WEIGHT,MODEL:WEIGHT (weights > 0), e.g. assistant=v1:0.9,v2:0.1"
        )
    return alias, variants
