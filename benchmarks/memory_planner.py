"""Predicted (ayar plan) vs measured (peak RSS of a short ayar train run) peak memory, per configuration.

    python benchmarks/memory_planner.py DATA.jsonl [--columns instruction=question,output=answer] [--only NAME]...
        [--measured results-memory-planner.json] [--reuse]

prints a markdown table for benchmarks/README.md. Measured peaks are kept in the --measured file; with
--reuse, configurations already measured there are only planned again (to check a planner change without
re-running the training). The data is cut to the 96 longest rows (written to a
temporary file), so that every batch of the short run is about as long as the planner's worst case (the
longest rows together). Each training run is a fresh process, 3 steps, no validation; the measured value
is that process's peak RSS (it includes loading the model and tokenizing the data, as a real run does).
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


def longest_rows(path: str, columns: dict, n: int, out: Path) -> Path:
    from ayar.data.dataset import load_records, parse_sources
    from ayar.data.render import Renderer
    from ayar.data.writers import write_records
    from ayar.models.load import load_tokenizer, resolve_model_path

    records = [r for src in parse_sources(path, "auto", columns) for r in load_records(src)][:4000]
    renderer = Renderer(load_tokenizer(resolve_model_path("default", log=lambda m: None)), max_length=100_000)
    records.sort(key=lambda r: len(renderer.render(r).input_ids), reverse=True)
    return write_records(records[:n], "messages", out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("--columns", default="", help="e.g. instruction=question,output=answer")
    p.add_argument("--only", action="append", default=[], help="a configuration's name (repeatable; default: all)")
    p.add_argument("--measured", default=str(Path(__file__).parent / "results-memory-planner.json"))
    p.add_argument("--reuse", action="store_true", help="take measured peaks from --measured where present")
    args = p.parse_args()
    store = Path(args.measured)
    measured_runs = json.loads(store.read_text()) if store.exists() else {}
    columns = dict(kv.split("=", 1) for kv in args.columns.split(",") if kv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = longest_rows(args.data, columns, 96, Path(tmp) / "longest.jsonl")
        for name, (kind, overrides) in CONFIGS.items():
            if args.only and name not in args.only:  # names hold commas: one --only per name
                continue
            common = [f"data.train={data}", *COMMON]
            plan = json.loads(ayar("plan", *common, *overrides, "--json").stdout)
            if not (args.reuse and name in measured_runs):
                out = Path(tmp) / f"runs-{len(rows)}"
                ayar("train", *common, *overrides, f"output.dir={out}", "training.memory_check=off")
                meta = json.loads(next(out.glob("run-*/run.json")).read_text())
                measured_runs[name] = {k: meta[k] for k in ("peak_rss_mb", "tokens_per_s", "passes")}
                store.write_text(json.dumps(measured_runs, indent=1) + "\n")
            run = measured_runs[name]
            predicted, measured = plan["total"] / 2**20, run["peak_rss_mb"]
            rows.append((name, kind, plan["tokens"], predicted, measured))
            print(
                f"{name}: predicted {predicted:.0f} MB, measured {measured:.0f} MB "
                f"({100 * (predicted / measured - 1):+.1f}%), "
                f"{run['tokens_per_s']} tokens/s, passes {run['passes']}; plan {plan['parts']}",
                file=sys.stderr,
            )
    print_table(rows)


def print_table(rows) -> None:
    """(name, role, tokens, predicted MB, measured MB) rows as benchmarks/README.md's markdown table."""
    print("| configuration | role | tokens in largest pass | predicted MB | measured MB | error |")
    print("|---|---|---|---|---|---|")
    for name, kind, tokens, p_mb, m_mb in rows:
        print(f"| {name} | {kind} | {tokens} | {p_mb:.0f} | {m_mb:.0f} | {100 * (p_mb / m_mb - 1):+.1f}% |")


if __name__ == "__main__":
    main()
