"""Slow tier: a short default-model run exported merged (fp32 and bf16), each through the release gate."""

import os
from pathlib import Path

import pytest

from ayar.config import load_config

pytestmark = pytest.mark.slow

USER_HOME = os.environ.get("AYAR_HOME", str(Path.home() / ".cache" / "ayar"))
GSM8K = Path(__file__).parents[1] / "fixtures" / "shared" / "gsm8k_train.jsonl"


def test_default_model_exports_pass_the_gate(monkeypatch, tmp_path):
    from ayar.export.gate import MergedArtifact, verify
    from ayar.export.merged import export_merged, load_run
    from ayar.train.sft import train_sft

    monkeypatch.setenv("AYAR_HOME", USER_HOME)
    cfg = load_config(None, [f"data.train={GSM8K}", "data.columns={instruction: question, output: answer}",
                             "data.val_ratio=0.05", "data.max_length=512", "training.max_steps=12",
                             "training.batch_size=8", "training.packing=true", "training.learning_rate=4e-4",
                             "training.tracker=none", f"output.dir={tmp_path}"])
    run = train_sft(cfg).path
    engine, _ = load_run(run, log=lambda *_: None)
    for dtype in ("fp32", "bf16"):
        out = export_merged(run, tmp_path / f"merged-{dtype}", dtype, log=lambda *_: None)
        report = verify(engine, MergedArtifact(out), dtype, str(out), max_new_tokens=48, log=print)
        print(dtype, [(c.name, c.ok, c.detail) for c in report.checks])
        assert report.ok, [c for c in report.checks if not c.ok]
