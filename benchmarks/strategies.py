"""ayar's own SFT loop in 2 processes under each distributed strategy, side by side in one invocation.

    python benchmarks/strategies.py                       # ddp, fsdp, zero2, zero3, one round
    python benchmarks/strategies.py --sides ddp,zero3 --rounds 2
    python benchmarks/strategies.py --sides zero2,zero2-offload,fsdp,fsdp-offload --out X.json

Each side is `ayar train examples/quickstart.yaml ... --nproc 2` (the default model, 10 steps, no evaluation or
checkpoints, LoRA dropout 0, global batch 2 processes x 4, 1 thread each, gloo), run in turn (rounds alternate the
sides); tokens/s, train seconds, each rank's peak RSS and the final loss are read from the run's run.json. The fused
CPU decoder is off on every side (FSDP and DeepSpeed do not take it), so the sides run the same modules. Results:
benchmarks/results-strategies.json; the table in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = {
    "ddp": ["distributed.strategy=ddp"],
    "fsdp": ["distributed.strategy=fsdp"],
    "zero2": ["distributed.strategy=deepspeed", "distributed.zero_stage=2"],
    "zero3": ["distributed.strategy=deepspeed", "distributed.zero_stage=3"],
    # offload asked on a CPU (where the states are in CPU RAM anyway): what the offload path itself costs here,
    # DeepSpeed's CPU Adam over its offloaded states, FSDP's offload policy
    "zero2-offload": ["distributed.strategy=deepspeed", "distributed.zero_stage=2", "distributed.offload=true"],
    "fsdp-offload": ["distributed.strategy=fsdp", "distributed.offload=true"],
}
COMMON = [
    "data.val_ratio=0",
    "training.max_steps=10",
    "training.save_steps=0",
    "training.eval_steps=0",
    "lora.dropout=0",
    "training.tracker=none",
    "training.batch_size=4",
    "training.threads=1",
    "training.fused=false",
]


def cpu() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    bf16 = "AVX512-BF16" if "avx512_bf16" in flags else "no AVX512-BF16 (the default model trains in fp32)"
    return f"{name}, {len([1 for line in flags.splitlines() if line.startswith('processor')])} cores, {bf16}"


def run_side(name: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "ayar", "train", str(ROOT / "examples" / "quickstart.yaml"), *COMMON, *SIDES[name]]
    cmd += [f"output.path={out}", "--nproc", "2"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    meta = json.loads((out / "run.json").read_text())
    return {
        "tokens_per_s": meta["tokens_per_s"],
        "train_seconds": meta["train_seconds"],
        "command_seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mb_per_rank": meta["peak_rss_mb_per_rank"],
        "predicted_peak_gb": round(meta["plan"].get("predicted_peak_bytes", 0) / 1e9, 2),
        "final_loss": meta["final_loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", default="ddp,fsdp,zero2,zero3", help=f"comma-separated, of {', '.join(SIDES)}")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results-strategies.json"))
    args = ap.parse_args()
    sides = args.sides.split(",")
    results: dict[str, list] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side in sides:
                results[side].append(run_side(side, Path(tmp) / f"{side}-{r}"))
                print(side, results[side][-1], flush=True)
    ddp = results.get("ddp")
    ratios = {}
    if ddp:
        for side, rows in results.items():
            ratios[side] = {
                "tokens_per_s_vs_ddp": [round(a["tokens_per_s"] / b["tokens_per_s"], 2) for a, b in zip(rows, ddp)],
                "peak_rss_vs_ddp": [
                    round(max(a["peak_rss_mb_per_rank"]) / max(b["peak_rss_mb_per_rank"]), 2) for a, b in zip(rows, ddp)
                ],
            }
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{cpu()}, {platform.machine()}",
        "command": "ayar train examples/quickstart.yaml " + " ".join(COMMON) + " <side> --nproc 2",
        "sides": {s: " ".join(SIDES[s]) for s in sides},
        "results": results,
        "ratios": ratios,
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
