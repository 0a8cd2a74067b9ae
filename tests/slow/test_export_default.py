"""Slow tier: a short default-model run exported in every format (merged fp32/bf16, ONNX int8, GGUF q8_0),
each through the release gate in its own runtime, then served through `ayar.load`."""

import os
from pathlib import Path

import pytest

from ayar.config import load_config

pytestmark = pytest.mark.slow

USER_HOME = os.environ.get("AYAR_HOME", str(Path.home() / ".cache" / "ayar"))
GSM8K = Path(__file__).parents[1] / "fixtures" / "shared" / "gsm8k_train.jsonl"


def test_default_model_exports_pass_the_gate(monkeypatch, tmp_path):
    from ayar.exports.gate import MergedArtifact, verify
    from ayar.exports.gguf import export_gguf
    from ayar.exports.merged import export_merged, load_run
    from ayar.exports.onnx import export_onnx
    from ayar.infer.gguf_engine import GgufEngine
    from ayar.infer.onnx_engine import OnnxEngine
    from ayar.training.sft import train_sft

    monkeypatch.setenv("AYAR_HOME", USER_HOME)
    cfg = load_config(
        None,
        [
            f"data.train={GSM8K}",
            "data.columns={instruction: question, output: answer}",
            "data.val_ratio=0.05",
            "data.max_length=512",
            "training.max_steps=12",
            "training.batch_size=8",
            "training.packing=true",
            "training.learning_rate=4e-4",
            "training.tracker=none",
            f"output.dir={tmp_path}",
        ],
    )
    run = train_sft(cfg).path
    engine, _ = load_run(run, log=lambda *_: None)
    quiet = lambda *_: None  # noqa: E731
    exports = {
        "fp32": lambda: MergedArtifact(export_merged(run, tmp_path / "merged-fp32", "fp32", log=quiet)),
        "bf16": lambda: MergedArtifact(export_merged(run, tmp_path / "merged-bf16", "bf16", log=quiet)),
        "int8": lambda: OnnxEngine(export_onnx(run, tmp_path / "onnx-int8", "int8", log=quiet)),
        "q8_0": lambda: GgufEngine(export_gguf(run, tmp_path / "gguf-q8_0", "q8_0", log=quiet)),
    }
    for kind, make in exports.items():
        report = verify(engine, make(), kind, kind, max_new_tokens=48, log=print)
        print(kind, [(c.name, c.ok, c.detail) for c in report.checks])
        assert report.ok, [c for c in report.checks if not c.ok]
