"""The Evaluate and Export & serve tabs: `ayar eval`, `ayar export` (with its release gate) and `ayar serve` on a
run, each as a job (ui/jobs.py), and what they wrote, read back from the run directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ayar.errors import AyarError
from ayar.netutil import free_port
from ayar.ui.jobs import Job, Jobs
from ayar.ui.workspace import Workspace


def job_status(jobs: Jobs, run: Path, kind: str, lines: int = 15) -> str:
    """The latest `kind` job of a run: its state, its error if it failed, and the end of its log."""
    job = jobs.latest(run, kind)
    if job is None:
        return f"no {kind} job for {run.name} yet"
    result = jobs.result(job)
    state = result["state"]
    text = f"**{kind}: {state}**" + (f" (port {job.port})" if job.port and state == "running" else "")
    if result.get("error"):
        text += f"\n\n{result['error']}"
    tail = _plain(jobs.tail(job, lines))
    return text + (f"\n\n```\n{tail}\n```" if tail else "")


# --- evaluate ----------------------------------------------------------------------------------------------------


def start_eval(ws: Workspace, jobs: Jobs, run: str, data: str = "", max_rows: int = 20, max_new_tokens: int = 64):
    path = ws.run(run)
    data = (data or "").strip()
    if data and not data.startswith("sample:"):
        data = str(ws.path(data, "evaluation data"))
    _refuse_busy(jobs, path, "eval")
    options = {"max_rows": int(max_rows), "max_new_tokens": int(max_new_tokens)}
    return jobs.start("eval", {"run": str(path), "data": data, "options": options}, path)


def eval_report(ws: Workspace, run: str) -> tuple[str, list[str]]:
    """RUN/eval/report.md (its pictures listed apart, for an image gallery) or a line saying there is none."""
    folder = ws.run(run) / "eval"
    try:
        md = (folder / "report.md").read_text()
    except OSError:
        return "no evaluation report yet: run one", []
    images = [str(folder / name) for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md) if (folder / name).is_file()]
    return re.sub(r"!\[[^\]]*\]\([^)]+\)\n?", "", md), images


# --- export ------------------------------------------------------------------------------------------------------


def start_export(ws: Workspace, jobs: Jobs, run: str, to: str, kind: str = "") -> Job:
    from ayar.exports.workflow import FORMATS

    if to not in FORMATS:
        raise AyarError(f"export format {to!r}: choose one of {', '.join(FORMATS)}")
    if kind and kind not in FORMATS[to].kinds:
        raise AyarError(f"{to} export kind {kind!r}: choose one of {', '.join(FORMATS[to].kinds)}")
    path = ws.run(run)
    _refuse_busy(jobs, path, "export")
    return jobs.start("export", {"run": str(path), "to": to, "kind": kind or FORMATS[to].default_kind}, path)


def kinds(to: str) -> list[str]:
    from ayar.exports.workflow import FORMATS

    return list(FORMATS[to].kinds) if to in FORMATS else []


def gate_lines(ws: Workspace, jobs: Jobs, run: str) -> str:
    """The release gate of the run's latest export: PASS/FAIL per check, as `ayar export` prints them."""
    path = ws.run(run)
    job = jobs.latest(path, "export")
    if job is None:
        return "no export yet"
    folder = path / "export" / f"{job.args['to']}-{job.args['kind']}"
    try:
        gate = json.loads((folder / "gate.json").read_text())
    except (OSError, ValueError):
        return f"{job.args['to']} {job.args['kind']}: {jobs.result(job)['state']}, no gate report yet"
    lines = [f"{'PASS' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail']}" for c in gate["checks"]]
    verdict = "gate passed" if gate["ok"] else "gate FAILED"
    return "\n".join([f"{verdict}: {folder}", *lines])


# --- serve -------------------------------------------------------------------------------------------------------


def start_serve(ws: Workspace, jobs: Jobs, run: str, port: int = 0, key: str = "") -> Job:
    path = ws.run(run)
    _refuse_busy(jobs, path, "serve")
    port = int(port) or free_port()
    return jobs.start("serve", {"run": str(path), "port": port, "key": key.strip()}, path, port=port)


def stop(jobs: Jobs, ws: Workspace, run: str, kind: str) -> str:
    path = ws.run(run)
    job = jobs.latest(path, kind)
    return jobs.stop(job, path) if job is not None else f"no {kind} job for {path.name}"


def served_models(port: int, key: str = "") -> list[str] | None:
    """What the server lists at /v1/models, or None while it is not answering yet."""
    import httpx

    try:
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=_auth(key), timeout=2)
        return [m["id"] for m in r.json()["data"]] if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def snippets(port: int, model: str, key: str = "") -> str:
    auth = f' \\\n  -H "Authorization: Bearer {key}"' if key else ""
    return f"""```bash
curl http://127.0.0.1:{port}/v1/chat/completions -H "Content-Type: application/json"{auth} \\
  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is 12 * 7?"}}]}}'
```

```python
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="{key or "unused"}")
reply = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "What is 12 * 7?"}}])
print(reply.choices[0].message.content)
```"""


def _refuse_busy(jobs: Jobs, run: Path, kind: str) -> None:
    job = jobs.latest(run, kind)
    if job is not None and jobs.alive(job):
        raise AyarError(f"{run.name}: a {kind} job is already running (stop it first)")


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _plain(text: str) -> str:
    """Rich markup and terminal colour codes out of a log tail."""
    return re.sub(
        r"\x1b\[[0-9;]*m|\[/(?:(?:green|red|yellow|bold|dim)[^\]]*)?\]|\[(?:green|red|yellow|bold|dim)[^\]]*\]",
        "",
        text,
    )
