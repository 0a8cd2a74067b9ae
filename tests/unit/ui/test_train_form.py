"""The Train tab's handlers: the form as a config, the checks `ayar train` runs first, start / stop / resume."""

from __future__ import annotations

import time

import pytest
import yaml

import ayar
from ayar.errors import AyarError
from ayar.ui import runs, train_form
from ayar.ui.jobs import Jobs
from ayar.ui.train_form import TrainForm
from ayar.ui.workspace import OutsideWorkspace, Workspace
from tests.helpers import save_tiny, write_jsonl

UNIQUE = [{"instruction": f"What is {a} plus {b}?", "output": f"{a + b}"} for a in range(2, 8) for b in range(3, 6)]


@pytest.fixture
def ws(tmp_path):
    save_tiny(tmp_path / "tiny")
    write_jsonl(tmp_path / "good.jsonl", UNIQUE)
    return Workspace.open(tmp_path)


def form(**fields) -> TrainForm:
    return TrainForm(**{"model": "tiny", "data": "good.jsonl", "max_steps": 2, **fields})


def test_the_form_is_a_config_with_its_paths_confined(ws):
    cfg = train_form.config_dict(
        form(columns="instruction=question, output=answer", advanced="training: {batch_size: 2}\nlora: {alpha: 8}"), ws
    )
    assert cfg["model"]["name"] == str(ws.root / "tiny") and cfg["data"]["train"] == str(ws.root / "good.jsonl")
    assert cfg["data"]["columns"] == {"instruction": "question", "output": "answer"}
    assert cfg["training"] == {"max_steps": 2, "learning_rate": 2e-4, "batch_size": 2}
    assert cfg["lora"] == {"r": 16, "alpha": 8} and cfg["output"]["dir"] == str(ws.runs)
    assert train_form.config_dict(form(data="sample:gsm8k", model="default"), ws)["data"]["train"] == "sample:gsm8k"
    assert train_form.config_dict(form(stage="dpo", preference_loss="orpo"), ws)["preference"] == {"loss": "orpo"}
    assert "preference" not in cfg
    with pytest.raises(OutsideWorkspace, match="data"):
        train_form.config_dict(form(data="/etc/passwd"), ws)
    with pytest.raises(OutsideWorkspace, match="advanced: data.validation"):
        train_form.config_dict(form(advanced="data: {validation: ../../v.jsonl}"), ws)
    with pytest.raises(AyarError, match="columns: 'question' is not FIELD=COLUMN"):
        train_form.config_dict(form(columns="question"), ws)
    with pytest.raises(AyarError, match="advanced: write YAML mapping"):
        train_form.config_dict(form(advanced="- a list"), ws)


def test_processes_share_the_model_as_the_strategy_picked(ws):
    """Several processes: the strategy picked is the config's distributed section and the memory plan is per
    process, split as it says (`ayar plan --nproc N`); one process runs as one, whatever is picked."""
    zero3 = train_form.config_dict(form(processes=2, strategy="zero3"), ws)
    assert zero3["distributed"] == {"strategy": "deepspeed", "zero_stage": 3}
    assert train_form.config_dict(form(processes=2, strategy="fsdp"), ws)["distributed"] == {"strategy": "fsdp"}
    assert "distributed" not in train_form.config_dict(form(processes=2, strategy="ddp"), ws)
    assert "distributed" not in train_form.config_dict(form(processes=1, strategy="fsdp"), ws)
    with pytest.raises(AyarError, match="strategy 'zero1': one of ddp, fsdp, zero2, zero3"):
        train_form.config_dict(form(processes=2, strategy="zero1"), ws)
    plans = {n: train_form.check(form(processes=n, strategy="fsdp"), ws).plan for n in (1, 2)}
    assert "per rank of 2 (fsdp" in plans[2] and "per rank" not in plans[1]


def test_check_reports_config_errors_with_the_did_you_mean(ws):
    c = train_form.check(form(advanced="training: {max_step: 3}"), ws)
    assert not c.ok and "did you mean 'max_steps'" in c.errors[0] and "Cannot train yet" in c.summary()


def test_check_names_the_broken_row_then_passes_when_fixed(ws):
    write_jsonl(ws.root / "bad.jsonl", [*UNIQUE[:4], {"instruction": "Say hi", "output": ""}, *UNIQUE[4:]])
    c = train_form.check(form(data="bad.jsonl"), ws)
    assert not c.ok and any("bad.jsonl:5" in e and "empty" in e for e in c.errors), c.errors
    c = train_form.check(form(data="bad.jsonl", advanced="data: {lint: warn}"), ws)  # warn: reported, not refused
    assert c.ok and "bad.jsonl:5" in c.lint
    c = train_form.check(form(), ws)
    assert c.ok and c.format == "alpaca" and c.plan.startswith("fits: ")
    assert c.preview_html.count("<section>") == 3 and 'class="t"' in c.preview_html  # trained tokens highlighted
    assert ayar.configure(yaml.safe_load(c.yaml)).training.max_steps == 2  # the YAML shown is the config run


def test_start_stop_and_resume_through_processes(ws):
    jobs = Jobs(ws.jobs)
    job = train_form.start(form(max_steps=2000, advanced="training: {save_steps: 0}"), ws, jobs)
    run = ws.runs / job.run.split("/")[-1]
    deadline = time.time() + 180
    while not runs.read_metrics(run) and time.time() < deadline:  # a step logged: training is under way
        assert jobs.result(job)["state"] in ("running", "done"), jobs.tail(job)
        time.sleep(0.3)
    assert runs.progress(run, jobs).status == "running"
    assert "stop requested" in jobs.stop(job, run)
    _wait(jobs, job)
    p = runs.progress(run, jobs)
    assert p.status == "stopped" and 0 < p.step < 2000 and p.total == 2000, (p, jobs.tail(job))
    again = train_form.resume(run, jobs)
    with pytest.raises(AyarError, match="is still training"):  # while one goes, no second resume
        train_form.resume(run, jobs)
    while runs.progress(run, jobs).step <= p.step and time.time() < deadline + 180:
        assert jobs.alive(again), jobs.tail(again)
        time.sleep(0.3)
    assert "stop requested" in jobs.stop(again, run)  # it went on from its checkpoint, and stops again
    _wait(jobs, again)
    assert runs.progress(run, jobs).status == "stopped" and runs.progress(run, jobs).step > p.step


def test_a_finished_run_and_a_failed_one(ws):
    jobs = Jobs(ws.jobs)
    done = train_form.start(form(name="my run!"), ws, jobs)
    assert done.run.split("/")[-1].startswith("my-run-")
    _wait(jobs, done)
    run = ws.runs / done.run.split("/")[-1]
    assert runs.progress(run, jobs).status == "completed" and runs.table(ws, jobs)[0][3] == "completed"
    write_jsonl(ws.root / "empty.jsonl", [])
    failed = train_form.start(form(data="empty.jsonl"), ws, jobs)
    _wait(jobs, failed)
    result = jobs.result(failed)
    assert result["state"] == "failed" and "empty.jsonl" in result["error"], result  # the message, not a traceback


def _wait(jobs, job, timeout=240):
    deadline = time.time() + timeout
    while jobs.alive(job) and time.time() < deadline:
        time.sleep(0.3)
    assert not jobs.alive(job), jobs.tail(job)


@pytest.mark.distributed
def test_a_run_in_two_processes_from_the_form_and_resumed_in_as_many(ws):
    """The form's Processes field: the job trains through `ayar.train(cfg, nproc=2)` (torchrun's processes, the
    run where the page follows it); Resume asks for as many processes as the run had."""
    jobs = Jobs(ws.jobs)
    job = train_form.start(form(processes=2, advanced="training: {batch_size: 2, threads: 1}"), ws, jobs)
    assert job.args["nproc"] == 2
    _wait(jobs, job)
    assert jobs.result(job)["state"] == "done", jobs.tail(job)
    run = ws.runs / job.run.split("/")[-1]
    meta = ayar.Run(run).meta
    assert meta["status"] == "completed" and meta["plan"]["world_size"] == 2, meta
    assert [p.name for p in ws.runs.glob("sft-lora-*")] == [run.name]  # where the page looked, and only there

    class Recorded:  # what Resume would start, without starting it
        def latest(self, *_):
            return None

        def start(self, kind, args, run):
            return args

    assert train_form.resume(run, Recorded()) == {"resume": str(run), "nproc": 2}
