"""Evaluate a run against its base model (or a model alone) and write a report.

examples:
  ayar eval runs/quickstart-20261125-101500                 the run's held-out split, tuned vs base
  ayar eval runs/quickstart-... --data heldout.jsonl --max-rows 200
  ayar eval runs/quickstart-... --extract 'regex:answer is (\\S+)' --judge-url http://127.0.0.1:8000/v1
  ayar eval --baseline default --data questions.jsonl       a model alone, before training (zero-shot baseline)
"""


def add_arguments(p) -> None:
    p.add_argument("run", nargs="?", help="run directory printed by `ayar train`")
    p.add_argument("--baseline", metavar="MODEL", help="evaluate MODEL alone (no run); needs --data")
    p.add_argument("--base", metavar="MODEL", help="compare with MODEL instead of the run's base model")
    p.add_argument("--data", help="evaluation data (default: the run's test split, else its validation split)")
    p.add_argument("--format", default="auto", help="row format of --data")
    p.add_argument("--columns", help="field renames ours=theirs, e.g. instruction=question,output=answer")
    p.add_argument("--max-rows", type=int, default=100, help="evaluate the first N rows (0: all; default 100)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer token budget (default 256)")
    p.add_argument("--extract", default="auto", help="answer extraction: auto, gsm8k, last_number, none, regex:PATTERN")
    p.add_argument(
        "--anchor", default="sample:anchor", help="forgetting-check data ('none' disables; default: bundled sample)"
    )
    p.add_argument(
        "--forgetting-threshold", type=float, default=0.05, help="relative anchor-loss increase flagged (default 0.05)"
    )
    p.add_argument("--judge-url", help="OpenAI-compatible base URL (.../v1) for an LLM-as-judge comparison")
    p.add_argument("--judge-model", default="gpt-4o-mini", help="model name for the judge")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable with the judge's API key")
    p.add_argument("--examples", type=int, default=5, help="example generations in the report")
    p.add_argument("--out", help="report directory (default RUN/eval)")
    p.add_argument("--json", action="store_true", help="print metrics.json instead of the summary")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ayar.config import EvalConfig
    from ayar.eval.report import metric_rows, verdict_line
    from ayar.eval.runner import evaluate_run

    columns = dict(kv.split("=", 1) for kv in (args.columns or "").split(",") if "=" in kv)
    cfg = EvalConfig(
        run=args.run,
        baseline=args.baseline,
        base=args.base,
        data=args.data,
        format=args.format,
        columns=columns,
        max_rows=args.max_rows,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        extract=args.extract,
        anchor=None if args.anchor in ("none", "") else args.anchor,
        forgetting_threshold=args.forgetting_threshold,
        judge_url=args.judge_url,
        judge_model=args.judge_model,
        judge_key_env=args.judge_key_env,
        examples=args.examples,
        out=args.out,
    )
    result = evaluate_run(cfg)
    if args.json:
        print((result.out / "metrics.json").read_text())
        return 0
    out = Console(highlight=False, soft_wrap=True)
    header, rows = metric_rows(result)
    table = Table(*header, title=f"{result.info['rows']} rows from {result.info['data']}")
    for r in rows:
        table.add_row(*r)
    out.print(table)
    for name, check in result.checks.items():
        if name == "judge":
            out.print(
                f"judge: tuned wins {100 * check['win_rate']:.0f}%, base wins {100 * check['loss_rate']:.0f}%, "
                f"ties {100 * check['tie_rate']:.0f}% (both answer orders)"
            )
        else:
            out.print(f"{name}: {check['message']}")
    if result.verdict:
        out.print(verdict_line(result.verdict))
    out.print(f"report: {result.out / 'report.html'}  ({result.out / 'report.md'}, {result.out / 'metrics.json'})")
    return 0
