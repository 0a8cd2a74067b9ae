"""The Train tab: a form -> a TrainConfig (the YAML `ayar train` would run), and the checks the CLI runs before
anything trains: config errors with their did-you-mean, data lint naming rows, three rows as the model sees them
(trained tokens highlighted), the memory plan. Then start, stop, resume, as jobs (ui/jobs.py)."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ayar.errors import AyarError
from ayar.rundir import RunDir
from ayar.ui.jobs import Job, Jobs
from ayar.ui.workspace import Workspace

METHODS = ("lora", "qlora", "dora", "pissa", "olora", "full")
STAGES = ("sft", "dpo", "reward", "grpo")
PREFERENCE_LOSSES = ("dpo", "ipo", "kto", "orpo", "simpo")  # the DPO family (stage dpo)
FORMATS = ("auto", "alpaca", "messages", "sharegpt", "completion", "preference", "hh", "text")
# how several processes share the model -> the config's distributed section (docs/training.md)
STRATEGIES = {
    "ddp": {},
    "fsdp": {"strategy": "fsdp"},
    "zero2": {"strategy": "deepspeed", "zero_stage": 2},
    "zero3": {"strategy": "deepspeed", "zero_stage": 3},
}


@dataclass
class TrainForm:
    """What the Train tab asks; everything else comes from `advanced` (YAML, as in a config file) or defaults."""

    model: str = "default"
    data: str = "sample:gsm8k"
    format: str = "auto"
    columns: str = ""  # `instruction=question, output=answer`: the file's column for each field ayar reads
    method: str = "lora"
    stage: str = "sft"
    preference_loss: str = "dpo"  # stage dpo: which of the family
    max_steps: int = 30
    learning_rate: float = 2e-4
    lora_r: int = 16
    max_length: int = 512
    processes: int = 1  # training processes on this machine (one per GPU; on a CPU they share its cores)
    strategy: str = "ddp"  # several processes: STRATEGIES (each holds the whole model, or FSDP / ZeRO split it)
    name: str = ""
    advanced: str = ""  # YAML merged over the rest: any config key (`training: {batch_size: 4}`)


@dataclass
class Check:
    ok: bool = False
    errors: list[str] = field(default_factory=list)  # config and data errors: training would refuse to start
    format: str = ""  # the data format detected (or given)
    lint: str = ""
    preview_html: str = ""
    plan: str = ""
    yaml: str = ""

    def summary(self) -> str:
        if self.errors:
            return "**Cannot train yet:**\n\n" + "\n\n".join(f"- {_md(e)}" for e in self.errors)
        return "**Ready to train.** " + self.plan.splitlines()[0] if self.plan else "**Ready to train.**"


def config_dict(form: TrainForm, ws: Workspace) -> dict:
    """The config the form describes, as the YAML of `ayar train`; paths typed in must lie in the workspace."""
    model = form.model.strip() or "default"
    if model != "default":
        model = (
            str(ws.run(model, "model")) if (ws.runs / model / "run.json").is_file() else str(ws.path(model, "model"))
        )
    data = form.data.strip()
    if not data.startswith("sample:"):
        data = str(ws.path(data, "data"))
    name = _slug(form.name) or f"{form.stage}-{form.method}"
    cfg: dict = {
        "model": {"name": model},
        "data": {"train": data, "max_length": int(form.max_length)},
        "method": form.method,
        "stage": form.stage,
        "training": {"max_steps": int(form.max_steps), "learning_rate": float(form.learning_rate)},
        "output": {"dir": str(ws.runs), "name": name},
    }
    if form.method != "full":
        cfg["lora"] = {"r": int(form.lora_r)}
    if form.stage == "dpo":
        cfg["preference"] = {"loss": form.preference_loss or "dpo"}
    if int(form.processes) > 1:
        distributed = STRATEGIES.get(form.strategy or "ddp")
        if distributed is None:
            raise AyarError(f"strategy {form.strategy!r}: one of {', '.join(STRATEGIES)}")
        if distributed:
            cfg["distributed"] = dict(distributed)
    if form.format and form.format != "auto":
        cfg["data"]["format"] = form.format
    if form.columns.strip():
        cfg["data"]["columns"] = parse_columns(form.columns)
    if form.advanced.strip():
        extra = yaml.safe_load(form.advanced)
        if not isinstance(extra, dict):
            raise AyarError("advanced: write YAML mapping config sections to values, e.g. `training: {batch_size: 4}`")
        cfg = _merge(cfg, extra)
        for key in ("train", "validation", "test"):  # paths given there are confined too
            for value in _as_list(cfg["data"].get(key)):
                path = value.get("path") if isinstance(value, dict) else value
                if isinstance(path, str) and path and not path.startswith("sample:"):
                    ws.path(path, f"advanced: data.{key}")
    return cfg


def check(form: TrainForm, ws: Workspace) -> Check:
    """Everything `ayar train` checks before loading weights, each part reported even when another fails."""
    from ayar import api

    out = Check()
    try:
        source = config_dict(form, ws)
        cfg = api.configure(source)
    except (AyarError, yaml.YAMLError) as e:
        out.errors.append(str(e))
        return out
    out.yaml = yaml.safe_dump(source, sort_keys=False)
    try:
        from ayar.data.outputs import input_format

        out.format = input_format(cfg.data)
        report = api.lint(config=cfg)
        out.lint = report.format() if report.issues else report.summary()
        if cfg.data.lint == "strict":  # as training: strict refuses errors, warn/off only report them
            out.errors += [_issue(i) for i in report.errors]
    except AyarError as e:
        out.errors.append(str(e))
        return out
    if cfg.stage == "sft":
        try:
            from ayar.data.preview import STYLE, html_sections

            rows = api.preview(config=cfg, n=3)
            tok = api._renderer(cfg.data, cfg.model.name).tok
            legend = "<p class=meta>Green: the tokens the loss is computed on; grey: context only.</p>"
            out.preview_html = f"<style>{STYLE}</style>{legend}{html_sections(tok, rows)}"
        except AyarError as e:
            out.preview_html = f"<p>{html.escape(str(e))}</p>"
    try:
        plan = api.plan(cfg, target=_processes_here(cfg, int(form.processes)))
        gb = lambda b: f"{b / 2**30:.1f}"
        verdict = "fits" if plan.fits else "does not fit"
        out.plan = f"{verdict}: {gb(plan.memory.total)} of {gb(plan.memory.available)} GB\n\n{plan.memory.table()}"
        if not plan.fits:
            out.errors.append(f"memory: {verdict} ({'; '.join(plan.fixes) or 'no single setting change fits'})")
    except AyarError as e:
        out.plan = f"no plan: {e}"
    out.ok = not out.errors
    return out


def _processes_here(cfg, nproc: int):
    """Several processes on this machine: the plan is per process, the model shared as the config's distributed
    section says (as `ayar plan --nproc N`); None for one."""
    if nproc <= 1:
        return None
    from ayar.models.device import choose_device
    from ayar.training.plan import Target, configured_sharding

    return Target(choose_device(cfg.model.device), None, configured_sharding(cfg, nproc))


def start(form: TrainForm, ws: Workspace, jobs: Jobs) -> Job:
    """A new run in its own process; its folder (RUNS/NAME-STAMP) is decided here so the page can follow it."""
    from ayar import api

    source = config_dict(form, ws)
    api.configure(source)  # refused here, with the message, rather than in the job's log
    taken = {j.run for j in jobs.all()}
    path = RunDir.new_path(ws.runs, source["output"].pop("name"), lambda p: str(p) in taken)
    source["output"] = {"path": str(path)}
    return jobs.start("train", {"config": source, "nproc": int(form.processes)}, path)


def resume(run: Path, jobs: Jobs) -> Job:
    """Continue a stopped or interrupted run from its last checkpoint (`ayar train --resume`)."""
    running = jobs.latest(run, "train")
    if running is not None and jobs.alive(running):
        raise AyarError(f"{run.name} is still training")
    run_dir = RunDir(run)
    meta = run_dir.read_meta() if run_dir.meta.is_file() else {}
    world = meta.get("plan", {}).get("world_size", 1)  # in as many processes as it ran
    return jobs.start("train", {"resume": str(run), "nproc": world}, run)


def parse_columns(text: str) -> dict:
    """`instruction=question, output=answer` -> {"instruction": "question", "output": "answer"}."""
    out = {}
    for part in re.split(r"[,\n]", text):
        if not part.strip():
            continue
        if "=" not in part:
            raise AyarError(f"columns: {part.strip()!r} is not FIELD=COLUMN (e.g. `instruction=question`)")
        key, value = (s.strip() for s in part.split("=", 1))
        out[key] = value
    return out


def _issue(issue) -> str:
    from ayar.data.lint import RULES

    _, what, fix = RULES[issue.code]
    return f"{issue.where}: {what}" + (f" ({issue.detail})" if issue.detail else "") + f"; fix: {fix}"


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _as_list(value) -> list:
    return value if isinstance(value, list) else [] if value in (None, "") else [value]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-.")


def _md(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")
