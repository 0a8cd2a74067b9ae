"""QLoRA against LoRA on a Trainer stage (DPO): peak RSS and seconds per step, one process on this CPU.

Each run is its own `ayar train examples/dpo.yaml` process (6 steps, batch 2, 256 tokens, the run's automatic dtype,
no evaluation), measured as run.json records it: the process's own peak RSS (/proc's VmHWM) and train_seconds. The
models: the default SmolLM2-135M, the 0.48B-parameter random Llama of benchmarks/fsdp_loading.py and a random Llama
of SmolLM2-1.7B's shape (1.71B parameters), both stored in bf16: the larger the model, the more of the memory is base
weights, what QLoRA stores in 4 bits. Methods alternate within each round so drift falls on both alike.

    .venv/bin/python benchmarks/qlora_stages.py [--rounds 2] [--models default,0.48b,1.7b] \
        [--overrides training.return_memory=true] [--out benchmarks/results-qlora-stages.json]

Needs the default model converted once (any `ayar train` with `model.name: default` does it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fsdp_loading import ROOT, SHAPE_048B, machine, make_models

# SmolLM2-1.7B's shape (its config.json): 24 layers of 2048, full multi-head attention
SHAPE_17B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
             "num_key_value_heads": 32, "head_dim": 64}  # fmt: skip
SHAPES = {"0.48b": SHAPE_048B, "1.7b": SHAPE_17B}


def train(model: str, method: str, out: Path, overrides=()) -> dict:
    cmd = [sys.executable, "-m", "ayar", "train", str(ROOT / "examples" / "dpo.yaml"), f"model.name={model}",
           f"method={method}", "training.max_steps=6", "training.eval_steps=0", "data.val_ratio=0",
           "training.batch_size=2", "data.max_length=256", "training.tracker=none", f"output.path={out}",
           *overrides]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = json.loads((out / "run.json").read_text())
    return {
        "peak_rss_mb": round(meta["peak_rss_mb"]),  # the run's own (VmHWM: not this parent's, which built models)
        "train_seconds": meta["train_seconds"],
        "seconds_per_step": round(meta["train_seconds"] / meta["steps"], 2),
        "final_loss": meta["final_loss"],
        "dtype": meta["plan"]["dtype"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default="default,0.48b,1.7b", help="comma-separated: default, 0.48b, 1.7b")
    ap.add_argument("--overrides", default="", help="comma-separated config overrides for every run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results-qlora-stages.json"))
    args = ap.parse_args()
    results = {"machine": machine(), "runs": []}
    extra = [o for o in args.overrides.split(",") if o]
    with tempfile.TemporaryDirectory() as tmp:
        models = {"default": "default"}
        for name in set(args.models.split(",")) & set(SHAPES):
            models[name] = str(make_models(Path(tmp) / name, SHAPES[name], dtypes=("bfloat16",))["bfloat16"])
        for r in range(args.rounds):
            for name in args.models.split(","):
                for method in ("lora", "qlora") if r % 2 == 0 else ("qlora", "lora"):
                    got = train(models[name], method, Path(tmp) / f"run-{name}-{method}-{r}", extra)
                    row = {"model": name, "method": method, "round": r + 1, "overrides": extra, **got}
                    results["runs"].append(row)
                    print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
