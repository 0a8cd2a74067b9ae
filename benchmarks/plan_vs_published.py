"""`ayar plan` for a GPU it does not have, against peak memory figures published with their settings.

Source: torchtune's README (2024, "Finetuning resource requirements"): Llama-2-7B, peak memory per GPU as
torch.cuda.max_memory_reserved() (GiB), batch size 2 on Alpaca, bf16, each with its linked config (LoRA rank 8,
alpha 16; QLoRA on q/k/v/o and the MLP; LoRA on q and v; activation checkpointing as in the config). The model is
given by its config.json alone (Llama-2-7B's published dimensions), so the plan assumes every row is 512 tokens
long (the dataset's max_seq_len then), the worst case. Different implementations: the prediction is for ayar's own
run with those settings, the figure is torchtune's.

Second source, QLoRA split by FSDP: Answer.AI's fsdp_qlora benchmarks (github.com/AnswerDotAI/fsdp_qlora,
benchmarks_03_2024.md, February-March 2024): peak memory per GPU (GiB) of their train.py on 2 GPUs (RTX 3090 / 4090),
`--train_type qlora` (peft's LoRA over bitsandbytes' NF4 layers, stored in bf16), its defaults then: LoRA rank 64,
alpha 16, dropout 0.1 on q/k/v/gate/up/down, pure bf16, gradient checkpointing; the dummy dataset (every row cut to
the context length). Their `DDP` row is FSDP without sharding (each GPU the whole model).
Run: .venv/bin/python benchmarks/plan_vs_published.py
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
LLAMA2_70B = {**LLAMA2_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8}  # fmt: skip
YI_34B = {**LLAMA2_7B, "hidden_size": 7168, "intermediate_size": 20480, "num_hidden_layers": 60,
          "num_attention_heads": 56, "num_key_value_heads": 8, "vocab_size": 64000}  # fmt: skip
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


# fsdp_qlora's train.py defaults (2024-03) on 2 GPUs: (what, model config, batch, context, strategy, offload, GiB)
QLORA_COMMON = ["method=qlora", "lora.r=64", "lora.alpha=16", "lora.dropout=0.1", "model.dtype=bfloat16",
                "lora.target_modules=[q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj]",
                "training.gradient_checkpointing=true"]  # fmt: skip
FSDP_QLORA = [
    ("Llama-2-7B, batch 1, 512 tokens", LLAMA2_7B, 1, 512, "fsdp", False, 4.98),
    ("Llama-2-7B, batch 1, 2048 tokens", LLAMA2_7B, 1, 2048, "fsdp", False, 5.21),
    ("Llama-2-7B, batch 4, 2048 tokens", LLAMA2_7B, 4, 2048, "fsdp", False, 11.22),
    ("Llama-2-7B, batch 10, 2048 tokens", LLAMA2_7B, 10, 2048, "fsdp", False, 20.97),
    ("Llama-2-7B, batch 8, 2048 tokens, not split (their DDP)", LLAMA2_7B, 8, 2048, "ddp", False, 20.94),
    ("Yi-34B, batch 2, 2048 tokens", YI_34B, 2, 2048, "fsdp", False, 23.05),
    ("Yi-34B, batch 4, 2048 tokens, CPU offload", YI_34B, 4, 2048, "fsdp", True, 22.98),
    ("Llama-2-70B, batch 2, 2048 tokens, CPU offload", LLAMA2_70B, 2, 2048, "fsdp", True, 14.92),
]


def predicted_gib(folder: Path, config: dict, overrides: list[str], target) -> float:
    """`ayar plan`'s peak for the model of `config` (its config.json alone, written into `folder`), in GiB."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    cfg = load_config(None, [f"model.name={folder}", *overrides])
    plan, _, _ = plan_for_config(cfg, log=lambda *_: None, target=target)
    return plan.total / 2**30


def row(what: str, published: float, predicted: float) -> str:
    return f"| {what} | {published:.2f} | {predicted:.2f} | {100 * (predicted - published) / published:+.0f}% |"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print("| setting | published (GiB) | ayar plan (GiB) | error |\n|---|---|---|---|")
        for what, overrides, gpus, strategy, published in CASES:
            target = Target("cuda", 24 * 2**30, Sharding(gpus, strategy))
            print(
                row(what, published, predicted_gib(Path(tmp) / "llama-2-7b", LLAMA2_7B, [*COMMON, *overrides], target))
            )
        print("\n| fsdp_qlora, 2 GPUs | published (GiB) | ayar plan (GiB) | error |\n|---|---|---|---|")
        for what, config, batch, length, strategy, offload, published in FSDP_QLORA:
            overrides = [*QLORA_COMMON, f"training.batch_size={batch}", f"data.max_length={length}"]
            target = Target("cuda", 24 * 2**30, Sharding(2, strategy, offload))
            print(row(what, published, predicted_gib(Path(tmp) / f"model-{id(config)}", config, overrides, target)))


if __name__ == "__main__":
    main()
