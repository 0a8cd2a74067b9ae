"""`ayar plan` for a GPU it does not have, against peak memory figures published with their settings.

Source: torchtune's README (2024, "Finetuning resource requirements"): Llama-2-7B, peak memory per GPU as
torch.cuda.max_memory_reserved() (GiB), batch size 2 on Alpaca, bf16, each with its linked config (LoRA rank 8,
alpha 16; QLoRA on q/k/v/o and the MLP; LoRA on q and v; activation checkpointing as in the config). The model is
given by its config.json alone (Llama-2-7B's published dimensions), so the plan assumes every row is 512 tokens
long (the dataset's max_seq_len then), the worst case. Different implementations: the prediction is for ayar's own
run with those settings, the figure is torchtune's. Run: .venv/bin/python benchmarks/plan_vs_published.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ayar.config import load_config
from ayar.training.memory import Sharding
from ayar.training.plan import Target, plan_for_config

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
}
ALL = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
COMMON = ["lora.r=8", "lora.alpha=16", "training.batch_size=2", "data.max_length=512", "model.dtype=bfloat16"]
# (what, overrides, GPUs, strategy, published GiB)
CASES = [
    ("QLoRA, 1x RTX 4090", ["method=qlora", f"lora.target_modules={ALL}", "lora.dropout=0",
                             "training.gradient_checkpointing=true"], 1, "ddp", 9.29),
    ("LoRA q/v, 1x RTX 4090", ["method=lora", "lora.target_modules=[q_proj,v_proj]",
                                "training.gradient_checkpointing=true"], 1, "ddp", 17.18),
    ("LoRA q/v, 2x RTX 4090 (FSDP)", ["method=lora", "lora.target_modules=[q_proj,v_proj]",
                                       "training.gradient_checkpointing=false"], 2, "fsdp", 14.17),
]  # fmt: skip


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "llama-2-7b"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(LLAMA2_7B))
        print("| setting | published (GiB) | ayar plan (GiB) | error |\n|---|---|---|---|")
        for what, overrides, gpus, strategy, published in CASES:
            cfg = load_config(None, [f"model.name={model}", *COMMON, *overrides])
            target = Target("cuda", 24 * 2**30, Sharding(gpus, strategy))
            plan, _, _ = plan_for_config(cfg, log=lambda *_: None, target=target)
            predicted = plan.total / 2**30
            print(f"| {what} | {published:.2f} | {predicted:.2f} | {100 * (predicted - published) / published:+.0f}% |")


if __name__ == "__main__":
    main()
