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


def test_arbitrary_foreign_configs_convert_or_say_why(tmp_path):
    """Fuzz: LLaMA-Factory / Axolotl keys with arbitrary values: an ayar config or a ConfigError, never a
    traceback."""
    import os

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ayar.errors import ConfigError
    from tests.reliability import count

    keys = [
        "stage",
        "finetuning_type",
        "dataset",
        "dataset_dir",
        "quantization_bit",
        "pref_loss",
        "pref_beta",
        "base_model",
        "adapter",
        "datasets",
        "load_in_4bit",
        "rl",
        "bf16",
        "fp16",
        "lora_rank",
        "lora_target",
        "report_to",
        "optim",
        "val_size",
        "cutoff_len",
        "learning_rate",
        "output_dir",
        "use_dora",
        "max_samples",
    ]
    scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8))
    value = st.recursive(
        scalar,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=6,
    )

    @settings(
        max_examples=int(os.environ.get("AYAR_FUZZ_EXAMPLES", "150")),
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(raw=st.dictionaries(st.sampled_from(keys), value, min_size=1, max_size=6))
    def check(raw):
        count("fuzzed foreign configs (config import)")
        try:
            import_config(raw, tmp_path)
        except ConfigError:
            pass

    check()
