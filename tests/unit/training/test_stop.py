"""A stop asked for while training (RUN/STOP, what `ayar ui`'s Stop writes): a checkpoint at the next step,
run.json says `stopped`, and `--resume` finishes the run as if it had never stopped."""

from __future__ import annotations

from ayar.rundir import RunDir
from ayar.training import checkpoint as ckpt
from ayar.training.dispatch import train
from ayar.training.sft import train_sft
from tests.helpers import MATH_ROWS, tiny_train_config, write_jsonl
from tests.unit.training.test_stages import PAIRS, config


def test_sft_stops_at_the_next_step_with_a_checkpoint_and_resumes(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 2)
    cfg = tiny_train_config(tiny_model_dir, data, tmp_path / "runs", max_steps=6, save_steps=0)
    cfg.output.path = str(tmp_path / "runs" / "r")
    cfg.data.lint = "warn"

    def ask_at_step_2(state):
        if state.step == 2:
            (tmp_path / "runs" / "r" / "STOP").touch()

    run = train_sft(cfg, callbacks=[ask_at_step_2])
    meta = run.read_meta()
    assert meta["status"] == "stopped" and meta["steps"] == 2 and meta["total_steps"] == 6
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(run.checkpoints)) == 2
    assert not run.stop_request.exists() and not run.adapter.exists()  # nothing final from a stopped run
    assert [r["step"] for r in run.read_metrics() if "loss" in r] == [1, 2]

    (run.path / "STOP").touch()  # a stale request does not stop the resumed run at once
    again = train(resume=run.path)
    meta = again.read_meta()
    assert meta["status"] == "completed" and meta["steps"] == 6 and again.adapter.is_dir()
    assert [r["step"] for r in again.read_metrics() if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_a_trl_stage_stops_on_request_with_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from ayar.training.recipe import Recipe

    asked = []

    def stop_requested(self):  # the file is Recipe's business (tested above); here: the Trainer's wiring
        asked.append(1)
        return len(asked) == 2

    monkeypatch.setattr(Recipe, "stop_requested", stop_requested)
    data = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    run = train(config(tiny_model_dir, data, tmp_path / "runs", "stage=dpo", "training.max_steps=5"))
    meta = RunDir.open(run.path).read_meta()
    assert meta["status"] == "stopped" and meta["steps"] == 2 and meta["total_steps"] == 5
    assert (run.checkpoints / "checkpoint-2").is_dir() and not run.adapter.exists()
