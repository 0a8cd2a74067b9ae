"""The Runs tab: the run directories under the workspace, live from their files (run.json, metrics.jsonl,
config.yaml) and the UI's job records, never from the browser's memory."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ayar.config.loader import dotted
from ayar.ui.jobs import Jobs
from ayar.ui.workspace import Workspace

COLUMNS = ["run", "stage", "method", "status", "step", "loss", "eval loss", "tokens/s", "ETA"]


@dataclass
class Progress:
    run: Path
    status: str  # starting | running | completed | stopped | interrupted | failed
    step: int
    total: int | None
    loss: float | None
    eval_loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    error: str = ""

    def line(self) -> str:
        parts = [f"**{self.run.name}**: {self.status}"]
        if self.total:
            parts.append(f"step {self.step} of {self.total}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.eval_loss is not None:
            parts.append(f"eval loss {self.eval_loss:.4f}")
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:,.0f} tokens/s")
        if self.eta_s is not None and self.status == "running":
            parts.append(f"ETA {_duration(self.eta_s)}")
        return ", ".join(parts) + (f"\n\n{self.error}" if self.error else "")


def read_metrics(run: Path) -> list[dict]:
    records = []
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return records


def read_meta(run: Path) -> dict:
    try:
        return json.loads((run / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def progress(run: Path, jobs: Jobs) -> Progress:
    meta, records = read_meta(run), read_metrics(run)
    job = jobs.latest(run, "train")
    result = jobs.result(job) if job is not None else {}
    status = meta.get("status", "starting")
    error = ""
    if job is not None and result.get("state") == "running":
        status = "running" if meta else "starting"
    elif status == "running":  # run.json says running, but no process is: killed, or failed
        status = "failed" if result.get("state") == "failed" else "interrupted"
    if result.get("state") == "failed":
        status, error = "failed", result.get("error", "")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("eval_loss") is not None]
    step = steps[-1]["step"] if steps else 0
    total = meta.get("total_steps")
    rate = _mean([r["tokens_per_s"] for r in steps[-10:] if "tokens_per_s" in r])
    eta = None
    secs = [r["step_seconds"] for r in steps[-10:] if "step_seconds" in r]
    if total and secs:
        eta = (total - step) * sum(secs) / len(secs)
    elif total and job is not None and step:
        eta = (total - step) * (time.time() - job.started) / step
    return Progress(
        run,
        status,
        step,
        total,
        steps[-1]["loss"] if steps else None,
        evals[-1]["eval_loss"] if evals else None,
        rate or meta.get("tokens_per_s"),
        eta,
        error,
    )


def table(ws: Workspace, jobs: Jobs) -> list[list]:
    """One row per run (COLUMNS), newest first; runs whose process has not written run.json yet included."""
    runs = ws.run_dirs()
    known = {str(r) for r in runs}
    starting = [Path(j.run) for j in jobs.all() if j.kind == "train" and j.run not in known and jobs.alive(j)]
    rows = []
    for run in starting + runs:
        p = progress(run, jobs)
        cfg = _config(run)
        rows.append(
            [
                str(run.relative_to(ws.runs)) if ws.runs in run.parents else run.name,
                cfg.get("stage", ""),
                cfg.get("method", ""),
                p.status,
                f"{p.step}/{p.total}" if p.total else str(p.step),
                _num(p.loss),
                _num(p.eval_loss),
                f"{p.tokens_per_s:,.0f}" if p.tokens_per_s else "",
                _duration(p.eta_s) if p.eta_s is not None and p.status == "running" else "",
            ]
        )
    return rows


def names(ws: Workspace, jobs: Jobs | None = None) -> list[str]:
    """Run names for the pickers: under runs/, newest first (with runs still being set up)."""
    rows = table(ws, jobs) if jobs is not None else [[str(r.relative_to(ws.runs))] for r in ws.run_dirs()]
    return [r[0] for r in rows]


def curves(runs: list[Path], key: str = "run") -> list[dict]:
    """Loss points of one or more runs for a line plot: {step, value, series} (series `RUN loss` / `RUN eval`)."""
    points = []
    for run in runs:
        label = run.name if key == "run" else key
        for r in read_metrics(run):
            if "loss" in r:
                points.append({"step": r["step"], "value": r["loss"], "series": f"{label} loss"})
            if r.get("eval_loss") is not None:
                points.append({"step": r["step"], "value": r["eval_loss"], "series": f"{label} eval"})
    return points


def compare(runs: list[Path]) -> list[list]:
    """Side by side: what differs in their configs and what they reached."""
    configs = {run: dotted(_config(run)) for run in runs}
    keys = sorted({k for c in configs.values() for k in c})
    differ = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs.values()}) > 1]
    rows = [[k, *(_short(configs[r].get(k)) for r in runs)] for k in differ if not k.startswith("output.")]
    for key in ("status", "steps", "final_loss", "final_eval_loss", "tokens_per_s", "train_seconds", "peak_rss_mb"):
        rows.append([key, *(_short(read_meta(r).get(key)) for r in runs)])
    return rows


def config_text(run: Path) -> str:
    try:
        return (run / "config.yaml").read_text()
    except OSError:
        return ""


def _config(run: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _num(value) -> str:
    return f"{value:.4f}" if value is not None else ""


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )
