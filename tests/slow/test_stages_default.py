"""Slow tier: issue 5's stages on the real default model (SmolLM2-135M-Instruct)."""

import json
import os
from pathlib import Path

import pytest

from ayar.config import EvalConfig, load_config

pytestmark = pytest.mark.slow

USER_HOME = os.environ.get("AYAR_HOME", str(Path.home() / ".cache" / "ayar"))


@pytest.fixture
def real_home(monkeypatch):
    monkeypatch.setenv("AYAR_HOME", USER_HOME)


def test_sft_then_dpo_moves_held_out_pairs_toward_the_chosen_answer(real_home, tmp_path):
    """SFT on the chosen answers of the bundled HH-RLHF pairs, then DPO from that run; on 40 pairs held out
    from both, the DPO model prefers the chosen answer more than the SFT model it started from."""
    from ayar.eval.runner import evaluate_run
    from ayar.training.dispatch import train

    common = [
        "data.train=sample:hh",
        "data.max_length=256",
        "data.val_ratio=0.1",
        "training.tracker=none",
        f"output.dir={tmp_path}",
    ]
    sft = train(
        load_config(
            None,
            [
                *common,
                "training.max_steps=10",
                "training.batch_size=8",
                "training.learning_rate=2e-4",
                "output.name=sft",
            ],
        )
    )
    dpo = train(
        load_config(
            None,
            [
                *common,
                "stage=dpo",
                f"model.name={sft.path}",
                "training.max_steps=20",
                "training.batch_size=4",
                "training.learning_rate=5e-4",
                "output.name=dpo",
            ],
        )
    )
    meta = json.loads(dpo.meta.read_text())
    assert meta["merged_adapters"] == [str((sft.path / "adapter").resolve())]
    result = evaluate_run(
        EvalConfig(run=str(dpo.path), data="sample:hh-heldout", anchor=None, out=str(tmp_path / "eval"))
    )
    shift = result.checks["preference_shift"]
    assert shift["implicit_accuracy"] > 0.5 and shift["implicit_margin"] > 0, shift


def test_qlora_on_the_default_model_trains_on_cpu(real_home, tmp_path):
    from ayar.training.dispatch import train

    run = train(
        load_config(
            None,
            [
                "method=qlora",
                "data.train=sample:gsm8k",
                "data.max_length=256",
                "training.max_steps=6",
                "training.batch_size=4",
                "training.learning_rate=1e-3",
                "training.tracker=none",
                f"output.dir={tmp_path}",
            ],
        )
    )
    losses = [r["loss"] for r in run.read_metrics() if "loss" in r]
    assert losses[-1] < losses[0], losses
    assert (run.adapter / "adapter_model.safetensors").is_file()


def test_dpo_with_qlora_on_the_default_model_trains_and_evaluates_on_the_full_base(real_home, tmp_path):
    """DPO over the default model's 4-bit base (12 steps on the bundled HH-RLHF pairs): it trains, and `ayar eval`
    scores the held-out pairs with its adapter on the full-precision base."""
    from safetensors.torch import load_file

    from ayar.eval.runner import evaluate_run
    from ayar.training.dispatch import train

    run = train(
        load_config(
            None,
            [
                "stage=dpo",
                "method=qlora",
                "data.train=sample:hh",
                "data.max_length=256",
                "data.val_ratio=0.1",
                "training.max_steps=12",
                "training.batch_size=4",
                "training.learning_rate=5e-4",
                "training.tracker=none",
                f"output.dir={tmp_path}",
            ],
        )
    )
    meta = json.loads(run.meta.read_text())
    assert meta["plan"]["quantized"] and meta["steps"] == 12
    adapter = load_file(run.adapter / "adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 0
    result = evaluate_run(EvalConfig(run=str(run.path), data="sample:hh-heldout", anchor=None, out=str(tmp_path / "e")))
    assert set(result.checks["preference_shift"]) >= {"implicit_accuracy", "implicit_margin"}
