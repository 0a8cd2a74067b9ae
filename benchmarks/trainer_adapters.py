"""A Trainer stage's adapters over a bf16 base: peft's default (each adapter's input copied to fp32, which autocast
casts back to bf16 for the matmul and keeps for backward; torch's dropout on a CPU, which keeps a noise tensor as
large as its input) against ayar's (training/trl_stage.py `compute_as_own_loop`: the input as it is, under autocast;
ayar's dropout, which keeps no mask).

Whole runs, each variant in its own fresh process, the variants alternating within each round; peak RSS, train
seconds and the final loss as run.json records them:
- DPO: `ayar train examples/dpo.yaml` (6 steps, no evaluation) on the longest hh-rlhf pairs (every batch about as long
  as data.max_length); LoRA dropout off (TRL's preference trainers, as ayar builds them);
- classification: the longest hh-rlhf conversations labelled chosen / rejected, batch 8 at 384 tokens, 6 steps;
- GRPO: `ayar train examples/grpo.yaml` (3 steps, no evaluation) on the bundled GSM8K sample, LoRA dropout 0.05.

    .venv/bin/python benchmarks/trainer_adapters.py ../shared/data/hh_rlhf/harmless_pairs.jsonl [--rounds 2] \
        [--only dpo|classification|grpo]... [--out benchmarks/results-trainer-adapters.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fsdp_loading import ROOT, machine
from memory_planner_stages import longest_pairs
from trl_head import patched_train

VARIANTS = ("peft", "ayar")
# `ayar train`, with peft's default put back for the "peft" variant (ayar's step left out)
TRAIN = ("import sys, ayar.training.trl_stage as s; variant = sys.argv.pop(1)\n"
         "if variant == 'peft': s.compute_as_own_loop = lambda trainer, device: None\n"
         "from ayar.cli import main; raise SystemExit(main(sys.argv[1:]))")  # fmt: skip
COMMON = ["training.eval_steps=0", "data.val_ratio=0", "training.tracker=none", "data.lint=warn"]


def runs(pairs: Path, texts: Path) -> dict:
    return {
        "dpo": [str(ROOT / "examples" / "dpo.yaml"), f"data.train={pairs}", "training.max_steps=6"],
        "classification": [
            "model.name=default",
            "task=classification",
            f"data.train={texts}",
            "training.max_steps=6",
            "training.batch_size=8",
            "data.max_length=384",
        ],  # fmt: skip
        "grpo": [str(ROOT / "examples" / "grpo.yaml"), "training.max_steps=3"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", help="hh-rlhf pairs (jsonl)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", action="append", default=[], help="dpo, classification or grpo (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results-trainer-adapters.json"))
    args = ap.parse_args()
    store = Path(args.out)
    results = json.loads(store.read_text()) if store.exists() else {}
    results["machine"] = machine()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        configs = runs(*longest_pairs(args.pairs, 64, tmp / "data"))
        for name, overrides in configs.items():
            if args.only and name not in args.only:
                continue
            results[name] = []
            for r in range(args.rounds):
                for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                    measured = patched_train(TRAIN, variant, [*overrides, *COMMON], tmp / f"{name}-{variant}-{r}")
                    row = {"variant": variant, "round": r + 1, **measured}
                    results[name].append(row)
                    print(name, json.dumps(row), flush=True)
                    store.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
