"""Long work in processes of its own: training, evaluation, export, a server. The page never waits on them and
never holds their state: each job is a JSON file (what, which run, pid), its log and, when it ends, its result,
under RUNS/.ayar-ui/, so a reload, a second tab or a restarted UI sees the same jobs. The process runs
`python -m ayar.ui.worker JOB.json`, which calls the API function the job names (never the `ayar` CLI)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ayar.fsutil import write_atomic

KINDS = ("train", "eval", "export", "serve")


@dataclass
class Job:
    id: str
    kind: str
    args: dict
    run: str  # the run directory it belongs to ("" while a new run's folder is being made)
    log: str
    pid: int = 0
    started: float = field(default_factory=time.time)
    port: int | None = None  # serve: where it listens

    @property
    def file(self) -> Path:
        return Path(self.log).with_suffix(".json")

    @property
    def result_file(self) -> Path:
        return Path(self.log).with_suffix(".result.json")


class Jobs:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._procs: dict[str, subprocess.Popen] = {}  # the jobs this UI process started (to reap them)

    def start(self, kind: str, args: dict, run: str | Path, port: int | None = None) -> Job:
        if kind not in KINDS:
            raise ValueError(f"job kind {kind!r}: one of {KINDS}")
        self.folder.mkdir(parents=True, exist_ok=True)
        jid = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{uuid.uuid4().hex[:6]}"
        job = Job(jid, kind, args, str(run), str(self.folder / f"{jid}.log"), port=port)
        write_atomic(job.file, json.dumps(asdict(job)))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        with open(job.log, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "ayar.ui.worker", str(job.file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stopping it stops its children too
                env=env,
            )
        job.pid = proc.pid
        self._procs[jid] = proc
        write_atomic(job.file, json.dumps(asdict(job)))
        return job

    def all(self) -> list[Job]:
        jobs = []
        for f in self.folder.glob("*.json"):
            if f.name.endswith(".result.json"):
                continue
            try:
                jobs.append(Job(**json.loads(f.read_text())))
            except (ValueError, TypeError):
                continue  # a job file being written; the next refresh reads it
        return sorted(jobs, key=lambda j: j.started, reverse=True)

    def latest(self, run: str | Path, kind: str | None = None) -> Job | None:
        run = str(run)
        return next((j for j in self.all() if j.run == run and (kind is None or j.kind == kind)), None)

    def alive(self, job: Job) -> bool:
        proc = self._procs.get(job.id)
        if proc is not None:
            return proc.poll() is None
        try:  # started by an earlier UI process: look for the pid, and that it is still our worker
            cmdline = Path(f"/proc/{job.pid}/cmdline").read_bytes()
        except OSError:
            return _pid_alive(job.pid)
        return b"ayar.ui.worker" in cmdline and job.id.encode() in cmdline

    def result(self, job: Job) -> dict:
        """{state: running | done | failed | ended, ...}: `ended` is a process gone without a result (killed)."""
        if self.alive(job):
            return {"state": "running"}
        try:
            return json.loads(job.result_file.read_text())
        except (OSError, ValueError):
            return {"state": "ended", "error": "the process ended without a result (killed?); see its log"}

    def stop(self, job: Job, run_dir: Path | None = None) -> str:
        """Training: ask for a clean stop (RUN/STOP: a checkpoint at the next step, resumable). Anything else,
        or a training that has not made its run directory yet: SIGTERM to its process group."""
        if not self.alive(job):
            return "not running"
        if job.kind == "train" and run_dir is not None and (run_dir / "run.json").is_file():
            (run_dir / "STOP").touch()
            return "stop requested: it saves a checkpoint at the end of the current step"
        try:
            os.killpg(job.pid, signal.SIGTERM)
        except ProcessLookupError:
            return "not running"
        return "stopped"

    def tail(self, job: Job, lines: int = 30) -> str:
        try:
            text = Path(job.log).read_text(errors="replace")
        except OSError:
            return ""
        # progress bars and carriage returns: keep what a terminal would finally show on each line
        return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])

    def stop_all(self, kinds=("serve",)) -> None:
        for job in self.all():
            if job.kind in kinds and self.alive(job):
                self.stop(job)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True
