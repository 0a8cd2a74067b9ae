"""Predicted (ayar plan) vs measured (peak RSS of a short ayar train run) peak memory of the Trainer stages.

    python benchmarks/memory_planner_stages.py ../shared/data/hh_rlhf/harmless_pairs.jsonl [--only NAME]...
        [--measured results-memory-planner-stages.json] [--reuse]

memory_planner.py's method for the stages that run on a transformers / TRL Trainer: each configuration is planned
with `ayar plan --json` and trained for 3 steps in a fresh process (no validation, freed memory returned at once,
as the planner counts what training holds), on the planner's worst micro-batch alone: as many hh-rlhf pairs as a
micro-batch holds, those whose shorter half is longest (of those whose prompt is at most 200 tokens, which TRL's DPO
keeps at 384 tokens), so that every step trains on that batch; the classification rows are the longest of those pairs'
chosen and rejected conversations, labelled so. The default model (SmolLM2-135M-Instruct),
LoRA r=16 on all linear layers. The rows marked "x 2" run in 2 processes (`--nproc 2`, planned per process): each
process's micro-batches are the longest row repeated (whichever rows a process draws, its batch is the worst one),
and the measured value is the larger process's training peak (run.json `training_peak_rss_mb_per_rank`).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from memory_planner import ayar, print_table, setting

CONFIGS = {
    "DPO, batch 4, max_len 384": ("check", ["stage=dpo"]),
    "DPO, batch 4, max_len 384, gradient checkpointing": ("check", ["stage=dpo",
                                                                    "training.gradient_checkpointing=true"]),
    "DPO, batch 2, max_len 512, fp32": ("check", ["stage=dpo", "training.batch_size=2", "data.max_length=512",
                                                 "model.dtype=float32"]),
    "KTO, batch 4, max_len 384": ("check", ["stage=dpo", "preference.loss=kto"]),
    "ORPO, batch 2, max_len 384": ("check", ["stage=dpo", "preference.loss=orpo", "training.batch_size=2"]),
    "reward model, batch 4, max_len 384": ("check", ["stage=reward"]),
    "classification, batch 8, max_len 384": ("check", ["task=classification", "training.batch_size=8", "CLASSIFY"]),
    "GRPO, 2 prompts x 4 answers, 160 new tokens": ("check", ["stage=grpo", "training.batch_size=8",
                                                             "grpo.num_generations=4", "grpo.max_completion_length=160",
                                                             "PROMPTS"]),
    # per process, 2 processes (accelerate's FSDP plugin, DeepSpeed through the Trainer)
    "DPO, batch 4, max_len 384, FSDP x 2": ("check", ["stage=dpo", "distributed.strategy=fsdp", "NPROC2"]),
    "DPO, batch 4, max_len 384, ZeRO-3 x 2": ("check", ["stage=dpo", "distributed.strategy=deepspeed",
                                                        "distributed.zero_stage=3", "NPROC2"]),
    "GRPO, 2 prompts x 4 answers, 160 new tokens, FSDP x 2": ("check", [
        "stage=grpo", "training.batch_size=8", "grpo.num_generations=4", "grpo.max_completion_length=160", "PROMPTS",
        "distributed.strategy=fsdp", "NPROC2"]),
}  # fmt: skip
COMMON = ["training.return_memory=true", "data.val_ratio=0", "training.max_steps=3", "training.tracker=none",
          "training.warmup_ratio=0", "training.batch_size=4", "data.max_length=384", "data.lint=warn",
          "training.eval_steps=0"]  # fmt: skip


def longest_pairs(path: str, n: int, tmp: Path) -> tuple[Path, Path]:
    """The `n` pairs whose shorter half is longest (preference rows), and their halves as labelled texts."""
    from ayar.data.dataset import load_records
    from ayar.data.records import Record
    from ayar.data.render import Renderer
    from ayar.data.writers import write_records
    from ayar.models.load import load_tokenizer, resolve_model_path

    records = load_records(path)[:4000]
    renderer = Renderer(load_tokenizer(resolve_model_path("default", log=lambda m: None)), max_length=100_000)
    halves = lambda r: (Record(r.messages, r.where, chosen=half) for half in (r.chosen, r.rejected))  # noqa: E731
    # prompts short enough that TRL's DPO keeps the pair (it drops one whose prompt fills max_length)
    records = [r for r in records if len(renderer.tok(renderer.prompt_text(r.messages))["input_ids"]) <= 200]
    records = sorted(records, key=lambda r: min(len(renderer.render(h).input_ids) for h in halves(r)), reverse=True)
    texts = [
        Record(where=r.where, text="\n".join(m["content"] for m in r.messages + half), label=label)
        for r in records
        for half, label in ((r.chosen, "chosen"), (r.rejected, "rejected"))
    ]
    tmp.mkdir()
    texts = sorted(texts, key=lambda r: len(renderer.tok(r.text)["input_ids"]), reverse=True)[:n]
    records = records[:n]
    pairs = write_records(records, "preference", tmp / "pairs.jsonl")
    return pairs, write_records(texts, "classification", tmp / "texts.jsonl")


def longest_prompts(n: int, tmp: Path) -> Path:
    """The `n` bundled GSM8K questions whose rendered prompts are longest (GRPO's rows: each sampled
    `grpo.num_generations` times)."""
    from ayar.data.dataset import load_records
    from ayar.data.render import Renderer
    from ayar.data.writers import write_records
    from ayar.models.load import load_tokenizer, resolve_model_path

    records = load_records("sample:gsm8k")
    renderer = Renderer(load_tokenizer(resolve_model_path("default", log=lambda m: None)), max_length=100_000)
    length = lambda r: len(renderer.tok(renderer.prompt_text(r.messages[:-1]))["input_ids"])  # noqa: E731
    tmp.mkdir()
    return write_records(sorted(records, key=length, reverse=True)[:n], "messages", tmp / "prompts.jsonl")


def repeat_first(path: str, n: int) -> Path:
    """A file of `path`'s first row `n` times (beside it)."""
    first = Path(path).read_text().splitlines()[0]
    out = Path(path).with_name(f"first-x{n}.jsonl")
    out.write_text((first + "\n") * n)
    return out


def completion_lengths(run: Path) -> dict:
    """The longest and mean sampled completion of a GRPO run's logged steps (TRL's `completions/*` metrics)."""
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    longest = [r["completions/max_length"] for r in logs if "completions/max_length" in r]
    mean = [r["completions/mean_length"] for r in logs if "completions/mean_length" in r]
    return {"completion_max_length": max(longest, default=None),
            "completion_mean_length": mean and sum(mean) / len(mean)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("pairs")
    p.add_argument("--only", action="append", default=[], help="a configuration's name (repeatable; default: all)")
    p.add_argument("--measured", default=str(Path(__file__).parent / "results-memory-planner-stages.json"))
    p.add_argument("--reuse", action="store_true", help="take measured peaks from --measured where present")
    args = p.parse_args()
    store = Path(args.measured)
    measured_runs = json.loads(store.read_text()) if store.exists() else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, overrides) in CONFIGS.items():
            if args.only and name not in args.only:
                continue
            # the planner's worst micro-batch is the longest rows together: the data is those rows alone, so that
            # every step trains on that very batch
            given = COMMON + overrides
            batch = int(setting(given, "training.batch_size", ""))
            where = Path(tmp) / f"data-{len(rows)}"
            if "PROMPTS" in overrides:  # GRPO: a step's prompts are batch_size / num_generations
                data = f"data.train={longest_prompts(batch // int(setting(given, 'grpo.num_generations', '')), where)}"
            else:
                pairs, texts = longest_pairs(args.pairs, batch, where)
                data = f"data.train={texts}" if "CLASSIFY" in overrides else f"data.train={pairs}"
            nproc = ["--nproc", "2"] if "NPROC2" in overrides else []
            if nproc:  # each process's every micro-batch the worst one: the longest row alone, repeated
                data = f"data.train={repeat_first(data.removeprefix('data.train='), 2 * batch)}"
            overrides = [o for o in overrides if o not in ("CLASSIFY", "PROMPTS", "NPROC2")]
            common = ["model.name=default", data, *COMMON, *overrides]
            plan = json.loads(ayar("plan", *common, *nproc, "--json").stdout)
            if not (args.reuse and name in measured_runs):
                out = Path(tmp) / f"run-{len(rows)}"
                ayar("train", *common, f"output.path={out}", "training.memory_check=off", *nproc)
                meta = json.loads((out / "run.json").read_text())
                # several processes: the larger process's training peak (setup's kept apart, as
                # memory_planner_ranks.py measures), each process training on the same rows
                peak = max(meta["training_peak_rss_mb_per_rank"]) if nproc else meta["peak_rss_mb"]
                measured_runs[name] = {"peak_rss_mb": peak, "dtype": meta["plan"]["dtype"],
                                       "train_seconds": meta["train_seconds"]}  # fmt: skip
                if nproc:
                    measured_runs[name]["training_peak_rss_mb_per_rank"] = meta["training_peak_rss_mb_per_rank"]
                if "stage=grpo" in overrides:
                    measured_runs[name] |= completion_lengths(out)
                store.write_text(json.dumps(measured_runs, indent=1) + "\n")
            run = measured_runs[name]
            predicted, measured = plan["total"] / 2**20, run["peak_rss_mb"]
            rows.append((name, kind, plan["tokens"], predicted, measured))
            error = 100 * (predicted / measured - 1)
            print(f"{name}: predicted {predicted:.0f} MB, measured {measured:.0f} MB ({error:+.1f}%); plan "
                  f"{plan['parts']}", file=sys.stderr, flush=True)  # fmt: skip
    print_table(rows)


if __name__ == "__main__":
    main()
