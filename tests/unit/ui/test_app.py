"""`ayar ui`: the page builds; loopback by default, any other address only with a login; the login file."""

from __future__ import annotations

import hashlib

import pytest

from ayar.cli import main
from ayar.errors import AyarError
from ayar.ui import app
from ayar.ui.workspace import Workspace


def test_the_page_builds_with_every_tab(tmp_path):
    page = app.build(Workspace.open(tmp_path))
    labels = {getattr(b, "label", None) for b in page.blocks.values()}
    assert {"Train", "Runs", "Chat", "Evaluate", "Export & serve"} <= labels


def test_another_address_needs_a_login(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AyarError, match="--host 0.0.0.0 makes the UI reachable from other machines: give --auth"):
        app.launch("0.0.0.0", 0, tmp_path)
    assert main(["ui", "--host", "192.168.1.5"]) != 0
    assert "--auth" in capsys.readouterr().err
    assert app._loopback("127.0.0.1") and app._loopback("::1") and app._loopback("localhost")


def test_the_login_file(tmp_path):
    f = tmp_path / "users.txt"
    f.write_text(f"# who may log in\nada:secret\nbob:sha256:{hashlib.sha256(b'pw').hexdigest()}\n")
    check = app.read_auth(f)
    assert check("ada", "secret") and check("bob", "pw")
    assert not check("ada", "wrong") and not check("bob", "sha256:x") and not check("eve", "secret")
    f.write_text("ada\n")
    with pytest.raises(AyarError, match="users.txt:1: write `user:password`"):
        app.read_auth(f)
    with pytest.raises(AyarError, match="cannot read it"):
        app.read_auth(tmp_path / "missing.txt")


def test_the_refresh_reads_the_runs_and_sends_only_what_changed(tmp_path):
    import json

    from ayar.ui.jobs import Jobs

    ws = Workspace.open(tmp_path)
    jobs = Jobs(ws.jobs)
    empty = app._page_state(ws, jobs, None)
    assert len(empty) == 10 and empty[2].startswith("no runs yet")
    run = ws.runs / "r"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "completed", "total_steps": 2}))
    (run / "config.yaml").write_text("stage: sft\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    state = app._page_state(ws, jobs, None)  # no run picked: the newest
    assert state[1]["value"] == "r" and "step 2 of 2" in state[2] and list(state[3]["value"]) == [2.0, 1.5]
    again = app._page_state(ws, jobs, "r")
    assert [app._key(v) for v in again] == [app._key(v) for v in state]  # unchanged: every output skipped
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n')
    changed = app._page_state(ws, jobs, "r")
    assert app._key(changed[3]) != app._key(state[3]) and app._key(changed[5]) == app._key(state[5])
