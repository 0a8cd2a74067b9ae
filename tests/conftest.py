"""Fixtures shared by the test suite; the helpers they build on are in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import MATH_ROWS, save_tiny, tiny_train_config, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2-style model directory (ChatML template)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run directory: 6 LoRA steps of the tiny Qwen2-style model on MATH_ROWS."""
    from ayar.training.sft import train_sft

    tmp = tmp_path_factory.mktemp("tinyrun")
    data = write_jsonl(tmp / "d.jsonl", MATH_ROWS * 2)
    cfg = tiny_train_config(tiny_model_dir, data, tmp / "runs", max_steps=6, eval_steps=2)
    cfg.data.lint = "warn"  # MATH_ROWS * 2 repeats rows on purpose
    cfg.data.cache = False  # session fixtures run before the per-test AYAR_HOME is set
    return train_sft(cfg).path


@pytest.fixture(autouse=True)
def _ayar_home(tmp_path_factory, monkeypatch):
    # Tests never write to the user's cache, except the slow tier, which sets its own.
    if "AYAR_TEST_HOME" not in os.environ:
        monkeypatch.setenv("AYAR_HOME", str(tmp_path_factory.getbasetemp() / "ayar-home"))


def pytest_terminal_summary(terminalreporter):
    """The reliability figures of this run (tests/reliability/__init__.py)."""
    import json

    from tests.reliability import COUNTS, FIGURES

    if not COUNTS and not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for what, n in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{what}: {n:,}")
    for what, figure in FIGURES:
        terminalreporter.write_line(f"{what}: {figure}")
    if os.environ.get("AYAR_RELIABILITY_REPORT"):
        Path(os.environ["AYAR_RELIABILITY_REPORT"]).write_text(
            json.dumps({"counts": dict(COUNTS), "figures": dict(FIGURES)}, indent=1) + "\n"
        )
