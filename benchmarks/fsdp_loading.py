"""Which FSDP (or DeepSpeed ZeRO-3) processes should read the weights: peak RSS per rank for each
`distributed.loading`.

A 0.48B-parameter Llama with random weights (SmolLM2's tokenizer; 1.9 GB in fp32), big enough that the whole model
outweighs what each of 2 processes holds while training, stored twice: in fp32 (loaded as stored) and in bf16
(converted to fp32 as it loads, on a CPU without bf16). Each file is trained (2 steps, 1 row of 128 tokens per
process, FSDP, 2 processes x 1 thread, memory returned at once) with each loading in turn; run.json records each
rank's peak RSS. `--stage dpo` (a Trainer stage, `examples/dpo.yaml`): rank0 against every_rank. `--stage sft`
(ayar's own loop, `examples/quickstart.yaml`, LoRA; `--method full` too): rank0 against parts (a full fine-tune
loaded by parts is saved by parts too; loaded by rank 0, it is gathered on rank 0 and saved whole); `--method
qlora`: every_rank (each process quantizes the base as it loads it) against rank0 (rank 0 quantizes it and sends the
others their parts of the 4-bit weights and the quant states). `--nproc 4`:
4 processes x 1 thread (on 2 cores: the seconds are not comparable then, the peaks are). `--strategy deepspeed`:
ZeRO-3 instead of FSDP, every_rank (each process loads the whole model, the engine splits it) against rank0 (the
model built split as it loads, rank 0 reading the files), for either stage.

    .venv/bin/python benchmarks/fsdp_loading.py [--stage dpo] [--rounds 1] [--out benchmarks/results-fsdp-loading.json]
    .venv/bin/python benchmarks/fsdp_loading.py --stage sft --out benchmarks/results-fsdp-parts.json
    .venv/bin/python benchmarks/fsdp_loading.py --stage sft --methods full --nproc 4 \
        --out benchmarks/results-fsdp-save.json
    .venv/bin/python benchmarks/fsdp_loading.py --strategy deepspeed --stage sft --methods lora,full \
        --out benchmarks/results-zero3-loading.json
    .venv/bin/python benchmarks/fsdp_loading.py --stage sft --methods qlora \
        --out benchmarks/results-fsdp-qlora-loading.json

Needs the default model converted once (any `ayar train` with `model.name: default` does it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# the 0.48B Llama above (SmolLM2's vocabulary and tied embeddings)
SHAPE_048B = {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 16,
              "num_key_value_heads": 4, "head_dim": 96}  # fmt: skip


def make_models(folder: Path, shape: dict = SHAPE_048B, dtypes=("float32", "bfloat16")) -> dict[str, Path]:
    """A random Llama of `shape` with SmolLM2's tokenizer, saved in each of `dtypes` under folder/<dtype>."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ayar.models.default import ensure_default_model

    src = ensure_default_model()
    config = AutoConfig.from_pretrained(src)
    config.update(shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = {}
    for dtype in dtypes:
        path = folder / dtype
        model.to(getattr(torch, dtype)).save_pretrained(path)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            shutil.copy(src / name, path / name)
        out[dtype] = path
    return out


LOADINGS = {"dpo": ("every_rank", "rank0"), "sft": ("rank0", "parts")}
QUANTIZED_LOADINGS = ("every_rank", "rank0")
ZERO3_LOADINGS = ("every_rank", "rank0")
CONFIGS = {"dpo": "dpo.yaml", "sft": "quickstart.yaml"}
STRATEGIES = {"fsdp": ["distributed.strategy=fsdp"], "deepspeed": ["distributed.strategy=deepspeed",
              "distributed.zero_stage=3"]}  # fmt: skip


def train(
    model: Path, loading: str, out: Path, stage: str = "dpo", method: str = "lora", nproc: int = 2, strategy="fsdp"
) -> dict:
    cmd = [sys.executable, "-m", "ayar", "train", str(ROOT / "examples" / CONFIGS[stage]), f"model.name={model}",
           f"method={method}", "model.dtype=float32", *STRATEGIES[strategy], f"distributed.loading={loading}",
           "training.max_steps=2", "training.eval_steps=0", "data.val_ratio=0.02", "training.tracker=none",
           "training.threads=1", "training.batch_size=1", "data.max_length=128", "training.return_memory=true",
           f"output.path={out}", "--nproc", str(nproc)]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start  # the whole command: start-up, loading, 2 steps, saving
    meta = json.loads((out / "run.json").read_text())
    return {
        "command_seconds": round(seconds, 1),
        "peak_rss_mb_per_rank": meta["peak_rss_mb_per_rank"],
        "loading": meta["plan"]["loading"],
        "saving": meta["plan"].get("saving"),
        "final_loss": meta["final_loss"],
        "train_seconds": meta["train_seconds"],
    }


def machine() -> str:
    """The CPU's name, its cores and whether it has native bf16 (AVX512-BF16), which decides the default dtype."""
    import os

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    bf16 = "avx512_bf16" in info
    return f"{name or platform.machine()}, {os.cpu_count()} cores, {'with' if bf16 else 'no'} AVX512-BF16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--stage", choices=sorted(LOADINGS), default="dpo")
    ap.add_argument("--strategy", choices=sorted(STRATEGIES), default="fsdp")
    ap.add_argument("--methods", default="lora", help="comma-separated, e.g. lora,full (--stage sft)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--stored", default="float32,bfloat16", help="the files to train from, comma-separated")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results-fsdp-loading.json"))
    args = ap.parse_args()
    results = {"machine": machine(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        models = make_models(Path(tmp))
        for r in range(args.rounds):
            for method in args.methods.split(","):
                for stored in args.stored.split(","):
                    path = models[stored]
                    loadings = LOADINGS[args.stage]
                    if args.strategy == "deepspeed" or method == "qlora":
                        loadings = ZERO3_LOADINGS if args.strategy == "deepspeed" else QUANTIZED_LOADINGS
                    for loading in loadings:
                        out = Path(tmp) / f"run-{method}-{stored}-{loading}-{r}"
                        got = train(path, loading, out, args.stage, method, args.nproc, args.strategy)
                        row = {"strategy": args.strategy, "stage": args.stage, "method": method, "stored": stored,
                               "nproc": args.nproc, "round": r + 1, **got}  # fmt: skip
                        results["runs"].append(row)
                        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
