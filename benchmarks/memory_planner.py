"""Predicted (ayar plan) vs measured (peak RSS of a short ayar train run) peak memory, per configuration.

    python benchmarks/memory_planner.py DATA.jsonl [--columns instruction=question,output=answer] [--only NAME]...
        [--measured results-memory-planner.json] [--reuse] [--dtype float32]

prints a markdown table for benchmarks/README.md. Measured peaks are kept in the --measured file; with --reuse,
configurations already measured there are only planned again (to check a planner change without re-running the
training), where the planned pass is still the one measured. The data is cut to the 96 longest rows; for each
configuration the planner names its heaviest pass over them (`ayar plan --json`: the examples' lengths), and the run
trains on exactly those examples as its one micro-batch (batch size and rows per pass = their number), so that every
step runs the pass the plan is for; the plan compared is `ayar plan` of that run. Each training run is a fresh
process, 3 steps, no validation; the measured value is training's peak RSS (run.json `training_peak_rss_mb`: setup's,
loading the model and tokenizing, is kept apart and printed beside it). `--dtype float32` (a config override)
measures the fp32 table on a machine whose `model.dtype: auto` is bf16.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# role: "check" rows only compare; the gradient-checkpointing term (one layer's activations twice: their
# gradients while its backward runs) was set by looking at the "sets" row.
CONFIGS = {
    "batch 8, max_len 512 (fused, 4 rows per pass)": ("check", []),
    "batch 8, max_len 512, modules (training.fused=false, 2 rows per pass)": ("check", ["training.fused=false"]),
    "batch 8, max_len 512, fused, whole micro-batch in one pass": ("check", ["training.rows_per_pass=8"]),
    "batch 8, max_len 512, fused, gradient checkpointing": (
        "sets the checkpointing term",
        ["training.gradient_checkpointing=true"],
    ),
    "batch 8, max_len 512, modules, gradient checkpointing": (
        "check",
        ["training.fused=false", "training.gradient_checkpointing=true"],
    ),
    "batch 16, max_len 256, fused, dropout 0, 8 rows per pass": (
        "check",
        ["training.batch_size=16", "data.max_length=256", "lora.dropout=0", "training.rows_per_pass=8"],
    ),
    "batch 8, max_len 512, modules, output head trained in full (lora.modules_to_save=[lm_head])": (
        "check",
        ["training.fused=false", "lora.modules_to_save=[lm_head]"],
    ),
    "batch 8, max_len 512, full fine-tune (method=full, modules, 2 rows per pass)": ("check", ["method=full"]),
    "batch 8, max_len 512, full fine-tune, gradient checkpointing": (
        "check",
        ["method=full", "training.gradient_checkpointing=true"],
    ),
    # a step of two passes: the first pass's gradients are kept through the second
    "batch 8, max_len 512, full fine-tune, 2 micro-batches per step (grad_accum=2)": (
        "check",
        ["method=full", "training.grad_accum=2"],
    ),
}
# return_memory: the planner predicts what training holds; the default allocator's RSS can run above it
COMMON = [
    "training.return_memory=true",
    "data.val_ratio=0",
    "training.max_steps=3",
    "training.tracker=none",
    "training.warmup_ratio=0",
    "training.batch_size=8",
    "data.max_length=512",
    "data.lint=warn",
]


def ayar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ayar", *args], capture_output=True, text=True, check=True)


def with_lengths(path: str, columns: dict) -> list[tuple[dict, int]]:
    """The first 4000 records of `path`, each with its length in tokens as the default model's template renders it."""
    from ayar.data.dataset import load_records, parse_sources
    from ayar.data.render import Renderer
    from ayar.models.load import load_tokenizer, resolve_model_path

    records = [r for src in parse_sources(path, "auto", columns) for r in load_records(src)][:4000]
    renderer = Renderer(load_tokenizer(resolve_model_path("default", log=lambda m: None)), max_length=100_000)
    return [(r, len(renderer.render(r).input_ids)) for r in records]


def longest_rows(path: str, columns: dict, n: int, out: Path) -> Path:
    from ayar.data.writers import write_records

    ranked = sorted(with_lengths(path, columns), key=lambda pair: pair[1], reverse=True)
    return write_records([r for r, _ in ranked[:n]], "messages", out)


def heaviest_rows(data: Path, max_length: int, heaviest: dict, out: Path) -> Path:
    """The rows of `data` making up the planned pass: one of each length it names (a length is all that counts)."""
    from ayar.data.dataset import load_records, parse_sources
    from ayar.data.render import Renderer
    from ayar.data.writers import write_records
    from ayar.models.load import load_tokenizer, resolve_model_path

    renderer = Renderer(load_tokenizer(resolve_model_path("default", log=lambda m: None)), max_length=max_length)
    pool = [r for src in parse_sources(str(data), "auto", {}) for r in load_records(src)]
    by_length = {}
    for r in pool:
        by_length.setdefault(len(renderer.render(r).input_ids), []).append(r)
    chosen = [by_length[n + heaviest["prefix"]].pop() for n in heaviest["lengths"]]
    return write_records(chosen, "messages", out)


def setting(overrides: list[str], key: str, default: str) -> str:
    """The last value `overrides` give `key` (e.g. "training.batch_size"), or `default`."""
    return next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith(key + "=")), default)


def arguments(results: str) -> argparse.ArgumentParser:
    """The options the planner benchmarks share; `results`: the measurements' file beside this one."""
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--columns", default="", help="e.g. instruction=question,output=answer")
    p.add_argument("--only", action="append", default=[], help="a configuration's name (repeatable; default: all)")
    p.add_argument("--measured", default=str(Path(__file__).parent / results))
    p.add_argument("--reuse", action="store_true", help="take measured peaks from --measured where present")
    return p


def parsed(p: argparse.ArgumentParser) -> tuple[argparse.Namespace, Path, dict, dict]:
    """(arguments, the measurements' file, the measurements stored there, --columns as a dict)."""
    args = p.parse_args()
    store = Path(args.measured)
    measured_runs = json.loads(store.read_text()) if store.exists() else {}
    return args, store, measured_runs, dict(kv.split("=", 1) for kv in args.columns.split(",") if kv)


def main() -> None:
    p = arguments("results-memory-planner.json")
    p.add_argument("--dtype", default="", help="model.dtype for every run (default: the config's, auto)")
    args, store, measured_runs, columns = parsed(p)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = longest_rows(args.data, columns, 96, Path(tmp) / "longest.jsonl")
        for name, (kind, overrides) in CONFIGS.items():
            if args.only and name not in args.only:  # names hold commas: one --only per name
                continue
            common = [*COMMON, *([f"model.dtype={args.dtype}"] if args.dtype else []), *overrides]
            heaviest = json.loads(ayar("plan", f"data.train={data}", *common, "--json").stdout)["heaviest_pass"]
            n = len(heaviest["lengths"])
            rows_of = heaviest_rows(
                data,
                int(setting(common, "data.max_length", "512")),
                heaviest,
                Path(tmp) / f"heaviest-{len(rows)}.jsonl",
            )
            common = [f"data.train={rows_of}", *common, f"training.batch_size={n}", f"training.rows_per_pass={n}"]
            plan = json.loads(ayar("plan", *common, "--json").stdout)
            if {**plan["heaviest_pass"], "trained": 0} != {**heaviest, "trained": 0}:  # rows of the same lengths
                raise SystemExit(f"{name}: the run's pass {plan['heaviest_pass']} is not the planned {heaviest}")
            lengths = {"lengths": heaviest["lengths"], "prefix": heaviest["prefix"]}
            if not (args.reuse and measured_runs.get(name, {}).get("pass") == lengths):  # a run of this pass
                out = Path(tmp) / f"runs-{len(rows)}"
                ayar("train", *common, f"output.dir={out}", "training.memory_check=off")
                meta = json.loads(next(out.glob("run-*/run.json")).read_text())
                keys = ("peak_rss_mb", "training_peak_rss_mb", "setup_peak_rss_mb", "tokens_per_s", "passes")
                measured_runs[name] = {**{k: meta.get(k) for k in keys}, "pass": lengths}
                store.write_text(json.dumps(measured_runs, indent=1) + "\n")
            run = measured_runs[name]
            # training's own peak (the plan's), where the run recorded it apart from setup's
            predicted, measured = plan["total"] / 2**20, run.get("training_peak_rss_mb") or run["peak_rss_mb"]
            rows.append((name, kind, plan["tokens"], predicted, measured))
            print(
                f"{name}: predicted {predicted:.0f} MB, measured {measured:.0f} MB "
                f"({100 * (predicted / measured - 1):+.1f}%; setup's peak {run.get('setup_peak_rss_mb')} MB), "
                f"{run['tokens_per_s']} tokens/s, passes {run['passes']}; plan {plan['parts']}",
                file=sys.stderr,
            )
    print_table(rows)


def print_table(rows) -> None:
    """(name, role, tokens, predicted MB, measured MB) rows as benchmarks/README.md's markdown table."""
    print("| configuration | role | tokens in the heaviest pass | predicted MB | measured MB | error |")
    print("|---|---|---|---|---|---|")
    for name, kind, tokens, p_mb, m_mb in rows:
        print(f"| {name} | {kind} | {tokens} | {p_mb:.0f} | {m_mb:.0f} | {100 * (p_mb / m_mb - 1):+.1f}% |")


if __name__ == "__main__":
    main()
