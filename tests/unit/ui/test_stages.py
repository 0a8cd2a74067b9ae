"""Evaluate and Export & serve: reports and gate lines read back from the run directory; what is refused."""

from __future__ import annotations

import json

import pytest

from ayar.errors import AyarError
from ayar.ui import stages
from ayar.ui.jobs import Job, Jobs
from ayar.ui.workspace import Workspace


def test_gate_lines_and_eval_report_from_the_run_directory(tmp_path):
    ws = Workspace.open(tmp_path)
    run = ws.runs / "r"
    (run / "eval").mkdir(parents=True)
    (run / "run.json").write_text("{}")
    jobs = Jobs(ws.jobs)
    assert stages.gate_lines(ws, jobs, "r") == "no export yet"
    (run / "eval" / "report.md").write_text("# report\n![loss curves](loss.png)\n| tuned | base |\n")
    (run / "eval" / "loss.png").write_bytes(b"png")
    md, images = stages.eval_report(ws, "r")
    assert "loss.png" not in md and "| tuned | base |" in md and images == [str(run / "eval" / "loss.png")]
    ws.jobs.mkdir(parents=True)
    job = Job("j1", "export", {"run": str(run), "to": "gguf", "kind": "q8_0"}, str(run), str(ws.jobs / "j1.log"))
    job.file.write_text(json.dumps(job.__dict__))
    job.result_file.write_text(json.dumps({"state": "done"}))
    assert "no gate report yet" in stages.gate_lines(ws, jobs, "r")
    (run / "export" / "gguf-q8_0").mkdir(parents=True)
    checks = [{"name": "loads", "ok": True, "detail": "in llama.cpp"}, {"name": "greedy", "ok": False, "detail": "2/3"}]
    (run / "export" / "gguf-q8_0" / "gate.json").write_text(json.dumps({"ok": False, "checks": checks}))
    assert stages.gate_lines(ws, jobs, "r").splitlines()[1:] == ["PASS  loads: in llama.cpp", "FAIL  greedy: 2/3"]
    assert stages.gate_lines(ws, jobs, "r").startswith("gate FAILED")
    with pytest.raises(AyarError, match="gguf export kind 'q9': choose one of"):
        stages.start_export(ws, jobs, "r", "gguf", "q9")
    with pytest.raises(AyarError, match="export format 'zip'"):
        stages.start_export(ws, jobs, "r", "zip")


def test_snippets_and_a_server_that_is_not_up():
    text = stages.snippets(8123, "my-run", "k1")
    assert "127.0.0.1:8123/v1/chat/completions" in text and "Bearer k1" in text and 'model="my-run"' in text
    assert stages.served_models(stages.free_port()) is None
    assert stages._plain("\x1b[32m[green]PASS[/]\x1b[0m x") == "PASS x"
