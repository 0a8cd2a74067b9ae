"""Slow tier: the default model SFT-tuned on GSM8K rows for a short CPU run, then `ayar eval` on 100
GSM8K questions split off before training (the run's test split), base vs tuned."""

import os
from pathlib import Path

import pytest

from ayar.config import EvalConfig, load_config

pytestmark = pytest.mark.slow

USER_HOME = os.environ.get("AYAR_HOME", str(Path.home() / ".cache" / "ayar"))
GSM8K = Path(__file__).parents[1] / "fixtures" / "shared" / "gsm8k_train.jsonl"  # first 300 GSM8K train rows


def test_tuned_model_beats_its_base_on_held_out_gsm8k(monkeypatch, tmp_path):
    from ayar.eval.runner import evaluate_run
    from ayar.training.sft import train_sft

    monkeypatch.setenv("AYAR_HOME", USER_HOME)
    cfg = load_config(
        None,
        [
            f"data.train={GSM8K}",
            "data.columns={instruction: question, output: answer}",
            "data.test_ratio=0.3334",
            "data.val_ratio=0.05",
            "data.max_length=512",
            "training.max_steps=24",
            "training.batch_size=8",
            "training.packing=true",
            "training.learning_rate=4e-4",
            "training.eval_steps=8",
            "training.tracker=none",
            f"output.dir={tmp_path}",
        ],
    )
    run = train_sft(cfg)
    result = evaluate_run(EvalConfig(run=str(run.path), max_rows=100, max_new_tokens=200, batch_size=10))
    assert result.info["rows"] == 100 and result.info["data"] == "the run's test split"
    tuned, base = result.models["tuned"], result.models["base"]
    # What a short run reliably changes is the answers' form (the "#### N" line, the GSM8K style), not the
    # arithmetic of a 135M model: so perplexity and ROUGE-L on held-out answers, not exact match.
    assert tuned["perplexity"] < base["perplexity"]
    assert tuned["rouge_l"] > base["rouge_l"]
    assert 0 <= tuned["stop_rate"] <= 1 and tuned["mean_new_tokens"] > 0
    assert (run.path / "eval" / "report.html").is_file()
