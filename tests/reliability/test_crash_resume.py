"""Crash safety: `ayar train` killed with SIGKILL at random moments (during a step, a checkpoint write, the final
save), then resumed with `ayar train --resume`: every resume finishes, and its per-step losses and final
adapter equal those of the run that was never interrupted. `make test` kills a few runs; the slow tier
(`make test-reliability`) kills 20."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import MATH_ROWS, write_jsonl
from tests.reliability import report


def _config(model_dir: Path, data: Path, out: Path) -> Path:
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text(
        f"model: {{name: {model_dir}, dtype: float32}}\n"
        f"data: {{train: {data}, val_ratio: 0.2, lint: warn, cache: false}}\n"
        "training: {max_steps: 8, batch_size: 4, save_steps: 1, eval_steps: 4, warmup_ratio: 0, tracker: none,\n"
        "           early_stopping_patience: 5, threads: 1}\n"
        f"output: {{dir: {out}, name: r}}\n"
    )
    return cfg


def _ayar(*args, env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ayar", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def _kill_and_resume(tiny_model_dir, tmp_path, kills: int, seed: int):
    env = {**os.environ, "AYAR_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS * 3)
    ref_out = tmp_path / "ref"
    start = time.perf_counter()
    proc = _ayar("train", str(_config(tiny_model_dir, data, ref_out)), env=env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    duration = time.perf_counter() - start
    (ref,) = ref_out.iterdir()
    rng, survived, restarted = random.Random(seed), 0, 0
    for k in range(kills):
        out = tmp_path / f"k{k}"
        proc = _ayar("train", str(_config(tiny_model_dir, data, out)), env=env)
        time.sleep(rng.uniform(0.3, 1.0) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        runs = list(out.iterdir()) if out.is_dir() else []
        if runs:  # resume the run it started
            proc = _ayar("train", "--resume", str(runs[0]), env=env)
        else:  # killed before the run directory existed (data, model loading): start it again
            restarted += 1
            proc = _ayar("train", str(_config(tiny_model_dir, data, out)), env=env)
        assert proc.wait(timeout=600) == 0, f"kill {k}: {proc.stderr.read()[-2000:]}"
        (run,) = out.iterdir()
        assert _losses(run) == pytest.approx(_losses(ref), rel=1e-6, abs=1e-7), f"kill {k}"
        mine, theirs = (
            load_file(run / "adapter" / "adapter_model.safetensors"),
            load_file(ref / "adapter" / "adapter_model.safetensors"),
        )
        assert mine.keys() == theirs.keys() and all((mine[n] - theirs[n]).abs().max() < 1e-6 for n in mine)
        assert json.loads((run / "run.json").read_text())["status"] == "completed"
        survived += 1
    report(
        "kills survived (SIGKILL, then --resume)",
        f"{survived}/{kills} ({restarted} before the run directory "
        f"existed), losses and adapter equal to the uninterrupted run",
    )


def test_killed_runs_resume_to_the_same_result(tiny_model_dir, tmp_path):
    _kill_and_resume(tiny_model_dir, tmp_path, kills=3, seed=1)


@pytest.mark.slow
def test_twenty_killed_runs_resume_to_the_same_result(tiny_model_dir, tmp_path):
    _kill_and_resume(tiny_model_dir, tmp_path, kills=20, seed=2)
