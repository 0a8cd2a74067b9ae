"""`ayar config import`: LLaMA-Factory and Axolotl configs as ayar's, with what could not be mapped listed; the
LLaMA-Factory example converts and trains."""

from __future__ import annotations

from pathlib import Path

import yaml

from ayar.cli import main
from ayar.config.importer import import_config

ROOT = Path(__file__).resolve().parents[3]
LF = ROOT / "examples" / "llama-factory" / "smollm2_lora_sft.yaml"


def test_the_llama_factory_example_converts_and_trains(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "mine.yaml"
    assert main(["config", "import", str(LF), "--out", str(out)]) == 0
    text = out.read_text()
    cfg = yaml.safe_load(text)
    assert cfg["method"] == "lora" and cfg["lora"] == {"r": 8, "target_modules": "all-linear"}
    assert cfg["training"]["batch_size"] == 4 and cfg["training"]["grad_accum"] == 2
    assert cfg["training"]["lr_scheduler"] == "cosine" and cfg["data"]["max_length"] == 512
    assert cfg["data"]["train"][0]["path"].endswith("gsm8k_demo.json") and cfg["model"]["dtype"] == "bfloat16"
    assert "not mapped: per_device_eval_batch_size" in text and "not needed by ayar:" in text
    # it trains (on the tiny model, a few steps, into an exact run directory)
    run = tmp_path / "run"
    overrides = [f"model.name={tiny_model_dir}", "model.dtype=float32", "training.max_steps=2", f"output.path={run}"]
    assert main(["train", str(out), *overrides, "data.lint=warn"]) == 0
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_an_axolotl_config_converts(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    raw = {
        "base_model": "some/model",
        "adapter": "qlora",
        "load_in_4bit": True,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_target_linear": True,
        "datasets": [{"path": "d.jsonl", "type": "alpaca"}, {"path": "hub/x"}],
        "sequence_len": 1024,
        "sample_packing": True,
        "micro_batch_size": 2,
        "num_epochs": 2,
        "optimizer": "adamw_bnb_8bit",
        "learning_rate": 2e-4,
        "bf16": "auto",
        "flash_attention": True,
        "warmup_steps": 10,
    }
    result = import_config(raw, tmp_path)
    c = result.config
    assert result.tool == "axolotl" and c["method"] == "qlora" and c["model"]["name"] == "some/model"
    assert c["lora"] == {"r": 16, "alpha": 32, "target_modules": "all-linear"}
    assert c["data"]["train"] == [{"path": str(data.resolve()), "format": "alpaca"}] and c["data"]["max_length"] == 1024
    assert c["training"]["optimizer"] == "adamw_8bit" and c["training"]["packing"] is True
    assert any(u.startswith("datasets: 'hub/x'") for u in result.unmapped)
    assert any(u.startswith("warmup_steps") for u in result.unmapped) and "flash_attention" in result.ignored
