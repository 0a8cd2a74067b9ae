"""Predicted (ayar plan) vs measured (peak RSS of a short ayar train run) peak memory, per configuration.

    python benchmarks/memory_planner.py [--held-out]    # prints a markdown table for benchmarks/README.md

Each training run is a fresh process, 3 steps, no validation; the measured value is that process's
peak RSS (it includes loading the model and tokenizing the data, as a real run does).
"""

import json
import subprocess
import sys
import tempfile

CONFIGS = {
    "bf16, batch 8, max_len 384, packed": ["training.batch_size=8", "data.max_length=384", "training.packing=true"],
    "bf16, batch 4, max_len 512, padded": ["training.batch_size=4", "data.max_length=512", "training.packing=false"],
    "bf16, batch 16, max_len 256, packed": ["training.batch_size=16", "data.max_length=256", "training.packing=true"],
    "fp32, batch 8, max_len 512, padded": ["training.batch_size=8", "data.max_length=512", "training.packing=false", "model.dtype=float32"],
    "bf16, batch 32, max_len 512, packed": ["training.batch_size=32", "data.max_length=512", "training.packing=true"],
}
# Held out: measured only after the formula was settled on the five above (python ... --held-out runs just these).
HELD_OUT = {
    "bf16, batch 8, max_len 512, padded, r=64 q/v only, no dropout": [
        "training.batch_size=8", "data.max_length=512", "training.packing=false", "lora.r=64", "lora.alpha=128",
        "lora.target_modules=[q_proj, v_proj]", "lora.dropout=0"],
    "bf16, batch 24, max_len 384, packed, dropout 0.1": ["training.batch_size=24", "data.max_length=384", "training.packing=true",
                                                         "lora.dropout=0.1"],
    "fp32, batch 16, max_len 256, packed": ["training.batch_size=16", "data.max_length=256", "training.packing=true", "model.dtype=float32"],
}
COMMON = ["data.train=sample:gsm8k", "data.val_ratio=0", "training.max_steps=3", "training.tracker=none", "training.warmup_ratio=0"]


def ayar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ayar", *args], capture_output=True, text=True, check=True)


def main() -> None:
    rows = []
    configs = HELD_OUT if "--held-out" in sys.argv else {**CONFIGS, **HELD_OUT}
    for name, overrides in configs.items():
        plan = json.loads(ayar("plan", *COMMON, *overrides, "--json").stdout)
        with tempfile.TemporaryDirectory() as out:
            ayar("train", *COMMON, *overrides, f"output.dir={out}")
            run = next(__import__("pathlib").Path(out).glob("run-*"))
            measured = json.loads((run / "run.json").read_text())["peak_rss_mb"]
        predicted = plan["total"] / 2**20
        rows.append((name, plan["tokens"], predicted, measured))
        print(f"{name}: predicted {predicted:.0f} MB, measured {measured:.0f} MB ({100 * (predicted / measured - 1):+.1f}%)", file=sys.stderr)
    print("| configuration | tokens in largest micro-batch | predicted MB | measured MB | error |")
    print("|---|---|---|---|---|")
    for name, tokens, p, m in rows:
        print(f"| {name} | {tokens} | {p:.0f} | {m:.0f} | {100 * (p / m - 1):+.1f}% |")


if __name__ == "__main__":
    main()
