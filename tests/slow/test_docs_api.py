"""docs/python-api.md's examples, executed in order in one namespace on the default model (as a user would run
them from the repository's root)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_python_api_docs_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python-api.md").read_text(), re.S)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    os.symlink(ROOT / "examples", tmp_path / "examples")
    namespace: dict = {}
    for n, code in enumerate(blocks):
        exec(compile(code, f"docs/python-api.md block {n + 1}", "exec"), namespace)
