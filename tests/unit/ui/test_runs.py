"""The Runs tab reads run directories and job records: status, progress, ETA, curves, comparisons."""

from __future__ import annotations

import json

import yaml

from ayar.ui import runs
from ayar.ui.jobs import Jobs
from ayar.ui.workspace import Workspace


def fake_run(ws: Workspace, name: str, meta: dict, metrics: list[dict], config: dict) -> None:
    path = ws.runs / name
    path.mkdir(parents=True)
    (path / "run.json").write_text(json.dumps(meta))
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics) + '{"step": 9, "lo')


def test_progress_status_and_eta_from_the_files(tmp_path):
    ws = Workspace.open(tmp_path)
    steps = [{"step": s, "loss": 2.0 - s / 10, "tokens_per_s": 100.0, "step_seconds": 2.0} for s in (1, 2, 3)]
    fake_run(ws, "a", {"status": "running", "total_steps": 10}, [*steps, {"step": 3, "eval_loss": 1.5}], {})
    fake_run(ws, "b", {"status": "completed", "total_steps": 3, "tokens_per_s": 80.0}, steps, {"lora": {"r": 8}})
    jobs = Jobs(ws.jobs)
    p = runs.progress(ws.runs / "a", jobs)
    # run.json says running but no process is: killed; `Resume` continues it
    assert (p.status, p.step, p.total, p.loss, p.eval_loss, p.eta_s) == ("interrupted", 3, 10, 1.7, 1.5, 14.0)
    assert "step 3 of 10" in p.line() and "eval loss 1.5000" in p.line()
    rows = {r[0]: r for r in runs.table(ws, jobs)}
    assert rows["b"][3:6] == ["completed", "3/3", "1.7000"] and rows["a"][3] == "interrupted"
    points = runs.curves([ws.runs / "a"])
    assert {p["series"] for p in points} == {"a loss", "a eval"} and len(points) == 4  # the half-written line skipped
    table = runs.compare([ws.runs / "a", ws.runs / "b"])
    assert ["lora.r", "", "8"] in table and ["final_loss", "", ""] in table
