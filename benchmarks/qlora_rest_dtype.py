"""QLoRA over a bf16 base: the base's unquantized rest (norms, embeddings, head) kept in bf16 (ayar's way since
2026-12-06, as TRL 1, Unsloth and Answer.AI's fsdp_qlora keep it) against the same run with it in fp32 (peft's
`prepare_model_for_kbit_training`, ayar's way before): peak RSS, tokens/s and losses, one process on this CPU.

Each run is its own `ayar train examples/quickstart.yaml method=qlora` process (the run's automatic dtype: bf16 on a
CPU with AVX512-BF16/AMX; on one without, the base is fp32 and both runs are the same). The fp32 run is the same
command with peft's preparation applied after ayar's (`--child fp32`, this script re-entered). The two alternate
within each round so drift falls on both alike.

    .venv/bin/python benchmarks/qlora_rest_dtype.py [--rounds 2] [--steps 20] [--out benchmarks/results-qlora-rest.json]

Needs the default model converted once (any `ayar train` with `model.name: default` does it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(rest: str, argv: list[str]) -> int:
    from ayar.cli import main
    from ayar.models import adapters

    if rest == "fp32":
        ours = adapters.for_trainer

        def upcast(model, method, lora_cfg, task_type="CAUSAL_LM"):
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            return ours(model, method, lora_cfg, task_type)

        adapters.for_trainer = upcast
    return main(argv)


def train(rest: str, out: Path, steps: int) -> dict:
    argv = ["train", str(ROOT / "examples" / "quickstart.yaml"), "method=qlora", f"training.max_steps={steps}",
            f"training.eval_steps={steps}", f"training.save_steps={10 * steps}", "training.tracker=none",
            f"output.path={out}"]  # fmt: skip
    cmd = [sys.executable, __file__, "--child", rest, *argv]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = json.loads((out / "run.json").read_text())
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "dtype": meta["dtype"],
        "peak_rss_mb": round(meta["training_peak_rss_mb"]),
        "tokens_per_s": meta["tokens_per_s"],
        "final_loss": meta["final_loss"],
        "eval_loss": meta["final_eval_loss"],
        "losses": [r["loss"] for r in losses if "loss" in r],
    }


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text()
    name = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    return f"{name}, AVX512-BF16: {'avx512_bf16' in flags}, AMX: {'amx_bf16' in flags}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results-qlora-rest.json"))
    args = ap.parse_args()
    runs: dict[str, list] = {"bf16": [], "fp32": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for rest in ("fp32", "bf16") if r % 2 else ("bf16", "fp32"):
                runs[rest].append(train(rest, Path(tmp) / f"{rest}-{r}", args.steps))
                print(rest, {k: v for k, v in runs[rest][-1].items() if k != "losses"}, flush=True)
    best = {k: (min(x["peak_rss_mb"] for x in v), max(x["tokens_per_s"] for x in v)) for k, v in runs.items()}
    result = {
        "machine": machine(),
        "steps": args.steps,
        "runs": runs,
        "peak_ratio_bf16_over_fp32": round(best["bf16"][0] / best["fp32"][0], 3),
        "speed_ratio_bf16_over_fp32": round(best["bf16"][1] / best["fp32"][1], 3),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2], sys.argv[3:]))
    main()
