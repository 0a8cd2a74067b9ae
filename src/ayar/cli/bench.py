"""Benchmark ayar against the plain alternative, in the same run, and report the ratios.

examples:
  ayar bench infer runs/quickstart-20261125-101500    the run's exports (merged, ONNX, GGUF): tokens/s, perplexity
  ayar bench serve runs/quickstart-20261125-101500    ayar serve vs one-at-a-time HF generate, 1/8/32 clients
  ayar bench train                                   default model, bundled GSM8K sample, batch 8, max_length 512
  ayar bench train examples/quickstart.yaml --steps 10
  ayar bench train data.train=gsm8k.jsonl data.columns='{instruction: question, output: answer}' \
      --rows 512 --json out.json
"""


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    t = sub.add_parser(
        "train", help="ayar's training vs plain TRL SFTTrainer + peft (same data, batches, LoRA, steps, seed)"
    )
    t.add_argument("config", nargs="?", help="training YAML (default: the built-in benchmark settings)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.batch_size=4")
    t.add_argument("--steps", type=int, default=8, help="optimizer steps per side (default 8)")
    t.add_argument("--warmup", type=int, default=2, help="first steps not timed (default 2)")
    t.add_argument("--rows", type=int, default=512, help="use the first N rows of the data (default 512)")
    t.add_argument("--sides", default="ayar,trl", help="which sides to run (default ayar,trl)")
    t.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    i = sub.add_parser(
        "infer", help="a run's exports (merged, ONNX, GGUF) side by side: tokens/s and perplexity vs fp32"
    )
    i.add_argument("run", help="a finished run directory (missing exports are made in RUN/export)")
    i.add_argument(
        "--formats",
        default="merged-fp32,merged-bf16,onnx-fp32,onnx-int8,gguf-f16,gguf-q8_0",
        help=(
            "comma-separated, from: merged-fp32, merged-bf16, onnx-fp32, onnx-int8, onnx-int4, gguf-f16, "
            "gguf-q8_0, gguf-q4_k_m"
        ),
    )
    i.add_argument("--rows", type=int, default=10, help="held-out GSM8K questions (bundled) to generate and score")
    i.add_argument("--max-new-tokens", type=int, default=64)
    i.add_argument("--json", metavar="FILE", help="also write the full results as JSON")
    s = sub.add_parser("serve", help="ayar serve vs a naive server answering one request at a time with HF generate")
    s.add_argument("source", nargs="?", default="default", help="run directory or model (default: the default model)")
    s.add_argument("--concurrency", default="1,8,32", help="client counts to measure (default 1,8,32)")
    s.add_argument("--requests-per-client", type=int, default=4)
    s.add_argument("--max-tokens", type=int, default=48)
    s.add_argument("--max-batch", type=int, default=8, help="ayar's --max-batch")
    s.add_argument(
        "--sides",
        default="ayar,naive",
        help="ayar, naive; on the run's GGUF export: ayar-gguf, ayar-serial, llama-server (needs --llama-server); "
        "on its GGUF LoRA export: ayar-gguf-lora, ayar-gguf-2lora (with --second-adapter)",
    )
    s.add_argument(
        "--llama-server", metavar="PATH", help="llama.cpp's server binary (benchmarks/build-llama-server.sh)"
    )
    s.add_argument(
        "--second-adapter",
        metavar="RUN",
        help="ayar-gguf-2lora: another run on the same base (with a GGUF LoRA export), or a GGUF LoRA file; requests "
        "alternate between it and the run's adapter (default: the run's adapter again under a second name)",
    )
    s.add_argument("--json", metavar="FILE", help="also write the full results as JSON")


# The reference setting: LoRA r16/alpha 32 all-linear, batch 8, max_length 512, lr 2e-4, no warm-up.
DEFAULTS = [
    "data.train=sample:gsm8k",
    "data.max_length=512",
    "training.batch_size=8",
    "training.learning_rate=2e-4",
    "training.warmup_ratio=0",
    "training.packing=false",
    "lora.r=16",
    "lora.alpha=32",
    "lora.target_modules=all-linear",
]


def run(args) -> int:
    return {"serve": run_serve, "infer": run_infer}.get(args.what, run_train)(args)


def run_infer(args) -> int:
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from ayar.perf.bench_infer import run_bench

    console = Console(stderr=True, highlight=False)
    result = run_bench(
        args.run, tuple(args.formats.split(",")), args.rows, args.max_new_tokens, log=lambda m: console.print(m)
    )
    table = Table(
        "format",
        "size MB",
        "tokens/s",
        "speed-up vs fp32",
        "perplexity",
        "vs fp32",
        title=f"bench infer: {result['rows']} held-out GSM8K questions, up to {result['max_new_tokens']} new tokens",
    )
    for fmt, m in result["formats"].items():
        table.add_row(
            fmt,
            f"{m['size_mb']:.0f}",
            f"{m['tokens_per_s']:.1f}",
            f"{m.get('speedup', float('nan')):.2f}x",
            f"{m['perplexity']:.4f}",
            f"{m.get('perplexity_delta_pct', float('nan')):+.2f}%",
        )
    Console(highlight=False).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def run_serve(args) -> int:
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from ayar.perf.bench_serve import run_bench

    console = Console(stderr=True, highlight=False)
    levels = [int(c) for c in args.concurrency.split(",")]
    result = run_bench(
        args.source,
        levels,
        args.requests_per_client,
        args.max_tokens,
        args.max_batch,
        tuple(args.sides.split(",")),
        log=lambda m: console.print(m),
        llama_server=args.llama_server,
        second_adapter=args.second_adapter,
    )
    table = Table(
        "side",
        "clients",
        "tokens/s",
        "TTFT p50 s",
        "TTFT p95 s",
        "latency p50 s",
        "latency p95 s",
        "errors",
        title=(
            f"bench serve: {args.source}, max_tokens {args.max_tokens}, {args.requests_per_client} requests per client"
        ),
    )
    for side, by_level in result["sides"].items():
        for c, m in by_level.items():
            table.add_row(
                side,
                str(c),
                f"{m['tokens_per_s']:.1f}",
                f"{m['ttft_p50']:.2f}",
                f"{m['ttft_p95']:.2f}",
                f"{m['latency_p50']:.2f}",
                f"{m['latency_p95']:.2f}",
                str(m["errors"]),
            )
    out = Console(highlight=False)
    out.print(table)
    for pair, by_level in result.get("ratios", {}).items():
        out.print(f"{pair} tokens/s: " + ", ".join(f"{r:.2f}x at {c} clients" for c, r in by_level.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def run_train(args) -> int:
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from ayar.cli import config_and_overrides
    from ayar.config import load_config
    from ayar.perf.bench_train import run_bench

    config, overrides = config_and_overrides(args.config, args.overrides)
    cfg = load_config(config, overrides if config else DEFAULTS + overrides)
    console = Console(stderr=True, highlight=False)
    result = run_bench(
        cfg,
        steps=args.steps,
        warmup=args.warmup,
        rows=args.rows,
        sides=tuple(args.sides.split(",")),
        log=lambda m: console.print(m),
    )
    out = Console(highlight=False)
    table = Table(
        "",
        *result["sides"],
        title=f"bench train: {result['rows']} rows, batch {result['batch_size']}x{result['grad_accum']}, "
        f"max_length {result['max_length']}, {result['steps']} steps ({result['warmup']} warm-up)",
    )
    rows = [
        ("real tokens/s", "tokens_per_s", "{:.1f}"),
        ("median step s", "median_step_s", "{:.2f}"),
        ("real tokens/step", "real_tokens_per_step", "{:.0f}"),
        ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
        ("final loss (last 1/4)", "final_loss", "{:.4f}"),
        ("GFLOP/s (4N/token)", "gflops", "{:.1f}"),
        ("% of matmul peak (its dtype)", "pct_peak", "{:.0f}%"),
        ("dtype", "dtype", "{}"),
    ]
    for label, key, fmt in rows:
        table.add_row(label, *[fmt.format(r[key]) for r in result["sides"].values()])
    out.print(table)
    if "ratios" in result:
        r = result["ratios"]
        out.print(
            f"ayar/TRL: {r['tokens_per_s']:.2f}x real tokens/s, {r['peak_rss']:.2f}x peak RSS, "
            f"final loss {100 * (r['final_loss'] - 1):+.1f}%"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
