"""Paths typed into the UI stay inside its working folder."""

from __future__ import annotations

import json

import pytest

from ayar.errors import AyarError
from ayar.ui.workspace import OutsideWorkspace, Workspace


def test_paths_are_confined_to_the_working_folder(tmp_path):
    root = tmp_path / "work"
    ws = Workspace.open(root)
    (root / "d.jsonl").write_text("{}\n")
    assert ws.path("d.jsonl", "data") == root / "d.jsonl"
    assert ws.path(str(root / "sub" / "x"), "data") == root / "sub" / "x"
    (tmp_path / "secret.txt").write_text("no")
    (root / "link").symlink_to(tmp_path / "secret.txt")
    for outside in ("../secret.txt", str(tmp_path / "secret.txt"), "/etc/passwd", "link", "sub/../../secret.txt"):
        with pytest.raises(OutsideWorkspace, match="data: .* is outside the UI's working folder"):
            ws.path(outside, "data")
    with pytest.raises(OutsideWorkspace, match="runs"):
        Workspace.open(root, "../elsewhere")


def test_runs_are_found_on_disk_and_named_by_their_folder(tmp_path):
    ws = Workspace.open(tmp_path)
    for name in ("a", "b"):
        (ws.runs / name).mkdir()
        (ws.runs / name / "run.json").write_text(json.dumps({"status": "completed"}))
    (ws.runs / "not-a-run").mkdir()
    assert {p.name for p in ws.run_dirs()} == {"a", "b"}
    assert ws.run("a") == ws.runs / "a" and ws.run("runs/b") == ws.runs / "b"
    with pytest.raises(AyarError, match="not a run directory"):
        ws.run("not-a-run")
    with pytest.raises(OutsideWorkspace):
        ws.run("../../a")
