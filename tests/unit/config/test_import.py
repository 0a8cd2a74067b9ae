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


# LLaMA-Factory's examples/deepspeed/ds_z3_offload_config.json (its training YAMLs name it as `deepspeed: FILE`)
LF_Z3_OFFLOAD = {
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0}, "bf16": {"enabled": "auto"},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": False, "contiguous_gradients": True,
        "reduce_bucket_size": "auto", "stage3_max_live_parameters": 1e9,
    },
}  # fmt: skip


def _lf(tmp_path, **extra) -> dict:
    return {"model_name_or_path": "m", "stage": "sft", "finetuning_type": "lora", **extra}


def test_a_deepspeed_file_named_by_the_config_becomes_the_distributed_section(tmp_path):
    """`deepspeed: FILE` (LLaMA-Factory, Axolotl, transformers): its ZeRO stage and offload; the file's other
    settings listed as ayar's own; a missing file or a stage ayar does not run listed as not mapped."""
    import json

    from ayar.config import TrainConfig
    from ayar.config.loader import from_dict

    ds = tmp_path / "examples" / "deepspeed" / "ds_z3_offload_config.json"
    ds.parent.mkdir(parents=True)
    ds.write_text(json.dumps(LF_Z3_OFFLOAD))
    result = import_config(_lf(tmp_path, deepspeed="examples/deepspeed/ds_z3_offload_config.json"), tmp_path)
    assert result.config["distributed"] == {"strategy": "deepspeed", "zero_stage": 3, "offload": True}
    assert not result.unmapped
    assert any("bf16, fp16, zero_allow_untested_optimizer, zero_optimization.contiguous_gradients" in i
               for i in result.ignored)  # fmt: skip
    cfg = from_dict(TrainConfig, result.config)
    assert (cfg.distributed.strategy, cfg.distributed.zero_stage, cfg.distributed.offload) == ("deepspeed", 3, True)
    inline = import_config(_lf(tmp_path, deepspeed={"zero_optimization": {"stage": 2}}), tmp_path)
    assert inline.config["distributed"] == {"strategy": "deepspeed", "zero_stage": 2}
    missing = import_config(_lf(tmp_path, deepspeed="ds_z2_config.json"), tmp_path)
    assert "distributed" not in missing.config and missing.unmapped[0].startswith("deepspeed: 'ds_z2_config.json'")
    (tmp_path / "z0.json").write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    zero0 = import_config(_lf(tmp_path, deepspeed="z0.json"), tmp_path)
    assert "distributed" not in zero0.config and "ZeRO stage 0" in zero0.unmapped[0]
    (tmp_path / "nvme.json").write_text(
        json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})
    )
    nvme = import_config(_lf(tmp_path, deepspeed="nvme.json"), tmp_path)
    assert nvme.config["distributed"] == {"strategy": "deepspeed", "zero_stage": 3}
    assert "offload to NVMe" in nvme.unmapped[0]


def test_axolotls_fsdp_settings_become_the_distributed_section(tmp_path):
    """Axolotl's two spellings (its examples/llama-3 qlora-fsdp-70b.yaml: `fsdp: [full_shard, auto_wrap]` and
    prefixed `fsdp_config`; 3b-qat-fsdp2.yaml: `fsdp_version: 2` and plain keys) and transformers' `fsdp` words."""
    base = {"base_model": "m", "adapter": "lora", "datasets": []}
    old = import_config({**base, "fsdp": ["full_shard", "auto_wrap"], "fsdp_config": {
        "fsdp_limit_all_gathers": True, "fsdp_sync_module_states": True, "fsdp_offload_params": True,
        "fsdp_use_orig_params": False, "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_sharding_strategy": "FULL_SHARD"}}, tmp_path)  # fmt: skip
    assert old.config["distributed"] == {"strategy": "fsdp", "offload": True} and not old.unmapped
    v2 = import_config({**base, "fsdp_version": 2, "fsdp_config": {
        "offload_params": False, "cpu_ram_efficient_loading": False, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer", "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True, "activation_checkpointing": True}}, tmp_path)  # fmt: skip
    assert v2.config["distributed"] == {"strategy": "fsdp"} and not v2.unmapped
    assert v2.config["training"]["gradient_checkpointing"] is True
    hybrid = import_config({**base, "fsdp": "hybrid_shard auto_wrap offload"}, tmp_path)
    assert hybrid.config["distributed"] == {"strategy": "fsdp", "shard": "hybrid", "offload": True}
    for words in ("shard_grad_op auto_wrap", ["no_shard"]):
        refused = import_config({**base, "fsdp": words}, tmp_path)
        assert "distributed" not in refused.config and refused.unmapped[0].startswith("fsdp: ")


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
        "deepspeed",
        "fsdp",
        "fsdp_config",
        "fsdp_version",
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
