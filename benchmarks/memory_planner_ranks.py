"""Predicted (ayar plan --nproc 2) vs measured peak memory per process of ayar's own loop under each strategy.

    python benchmarks/memory_planner_ranks.py DATA.jsonl [--columns instruction=question,output=answer] [--only NAME]...
        [--measured results-memory-planner-ranks.json] [--reuse] [--length 408]

memory_planner.py's method for several processes: every row is cut to one length (`--length`, data.max_length; rows
shorter than it are left out), so every pass of every process is the pass the plan is for, whichever rows a process
draws. Each configuration is planned per process with `ayar plan ... --nproc 2 --json` (the strategy from the config's
`distributed` section) and trained for 3 steps with `ayar train ... --nproc 2` in fresh processes (no validation, freed
memory returned at once); the measured value is the larger of the two processes' training peaks (run.json
`training_peak_rss_mb_per_rank`; setup's, loading the model and tokenizing, is kept apart). The default length, 408
tokens, is 384 after the chat template's 24-token opening the fused decoder shares: the longest segment whose
attention probabilities per-example attention keeps, the heaviest kind of pass in bf16.
"""

import json
import sys
import tempfile
from pathlib import Path

import memory_planner as planner
from memory_planner import arguments, ayar, parsed, print_table, with_lengths

CONFIGS = {
    "DDP, fused decoder": ("check", ["distributed.strategy=ddp"]),
    "DDP, modules (training.fused=false)": ("check", ["distributed.strategy=ddp", "training.fused=false"]),
    "FSDP (full shard)": ("check", ["distributed.strategy=fsdp"]),
    # the packed 4-bit bytes split, the quant states whole in each process
    "FSDP, QLoRA": ("check", ["distributed.strategy=fsdp", "method=qlora"]),
    "DDP, QLoRA": ("check", ["distributed.strategy=ddp", "method=qlora"]),
    "DeepSpeed ZeRO-3, QLoRA": (
        "check",
        ["distributed.strategy=deepspeed", "distributed.zero_stage=3", "method=qlora"],
    ),
    "DeepSpeed ZeRO-2": ("check", ["distributed.strategy=deepspeed", "distributed.zero_stage=2"]),
    "DeepSpeed ZeRO-3": ("check", ["distributed.strategy=deepspeed", "distributed.zero_stage=3"]),
    # DeepSpeed's linears keep the inputs of the layers without adapters too
    "DeepSpeed ZeRO-3, LoRA on q/v only": (
        "check",
        ["distributed.strategy=deepspeed", "distributed.zero_stage=3", "lora.target_modules=[q_proj, v_proj]"],
    ),
}
# memory_planner.py's settings, with a batch of 4 per process (the length is --length)
COMMON = [o for o in planner.COMMON if not o.startswith(("training.batch_size=", "data.max_length="))]
COMMON.append("training.batch_size=4")


def rows_of_length(path: str, columns: dict, length: int, n: int, out: Path) -> Path:
    """`n` rows of at least `length` tokens (data.max_length cuts each to exactly that)."""
    from ayar.data.writers import write_records

    long = [r for r, tokens in with_lengths(path, columns) if tokens >= length]
    if len(long) < n:
        raise SystemExit(f"{len(long)} rows of {length} tokens or more in the first 4000 of {path}; {n} needed")
    return write_records(long[:n], "messages", out)


def main() -> None:
    p = arguments("results-memory-planner-ranks.json")
    p.add_argument("--length", type=int, default=408, help="every row's tokens (data.max_length)")
    args, store, measured_runs, columns = parsed(p)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = rows_of_length(args.data, columns, args.length, 32, Path(tmp) / "rows.jsonl")
        for name, (kind, overrides) in CONFIGS.items():
            if args.only and name not in args.only:
                continue
            common = [f"data.train={data}", f"data.max_length={args.length}", *COMMON, *overrides]
            plan = json.loads(ayar("plan", *common, "--nproc", "2", "--json").stdout)
            lengths = {"lengths": plan["heaviest_pass"]["lengths"], "prefix": plan["heaviest_pass"]["prefix"]}
            if len(set(lengths["lengths"])) != 1:
                raise SystemExit(f"{name}: the planned pass {lengths} is not rows of one length")
            if not (args.reuse and measured_runs.get(name, {}).get("pass") == lengths):
                out = Path(tmp) / f"run-{len(rows)}"
                ayar("train", *common, f"output.path={out}", "training.memory_check=off", "--nproc", "2")
                meta = json.loads((out / "run.json").read_text())
                keys = ("peak_rss_mb_per_rank", "training_peak_rss_mb_per_rank", "tokens_per_s", "passes")
                measured_runs[name] = {
                    **{k: meta.get(k) for k in keys},
                    "dtype": meta["plan"]["dtype"],
                    "pass": lengths,
                }
                store.write_text(json.dumps(measured_runs, indent=1) + "\n")
            run = measured_runs[name]
            predicted, measured = plan["total"] / 2**20, max(run["training_peak_rss_mb_per_rank"])
            rows.append((name, kind, plan["tokens"], predicted, measured))
            print(
                f"{name}: predicted {predicted:.0f} MB per process, measured {run['training_peak_rss_mb_per_rank']} "
                f"({100 * (predicted / measured - 1):+.1f}%; whole processes {run['peak_rss_mb_per_rank']}), "
                f"{run['tokens_per_s']} tokens/s, {run['dtype']}, passes {run['passes']}; plan {plan['parts']}",
                file=sys.stderr,
                flush=True,
            )
    print_table(rows)


if __name__ == "__main__":
    main()
