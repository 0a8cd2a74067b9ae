"""Reliability figures: tests count what they tried (fuzzed inputs, round trips, kills survived) with `count` and
`report`; tests/conftest.py prints them at the end of the run and writes them to $AYAR_RELIABILITY_REPORT (JSON)
when it is set (`make test-reliability`)."""

from collections import Counter

COUNTS: Counter = Counter()
FIGURES: list[tuple[str, str]] = []


def count(what: str, n: int = 1) -> None:
    COUNTS[what] += n


def report(what: str, figure: str) -> None:
    FIGURES.append((what, figure))
