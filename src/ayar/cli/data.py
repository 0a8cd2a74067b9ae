"""Look at, check, clean and convert training data before training on it.

examples:
  ayar data inspect train.jsonl                          rows, token lengths (PNG), EOS, empty fields,
                                                         languages, diversity
  ayar data lint train.jsonl --val val.jsonl             errors and warnings with row numbers; exit 1 on errors
  ayar data lint --config examples/quickstart.yaml       the same check `ayar train` runs, on the config's data
  ayar data preview train.jsonl -n 3                     rows as the model sees them, trained tokens
                                                         highlighted (+ HTML)
  ayar data clean train.jsonl --out clean.jsonl          dedup (exact + MinHash), PII scrub, length filters, report
  ayar data convert hh.jsonl --to preference --out pairs.jsonl
  ayar data convert gsm8k.jsonl --columns instruction=question,output=answer --to messages --out gsm8k-chat.jsonl
  ayar data stats train.jsonl                            diversity and languages only (no tokenizer needed)
"""

ACTIONS = ("inspect", "lint", "preview", "clean", "convert", "stats")


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    helps = {
        "inspect": "rows, token lengths, EOS, empty fields, languages, diversity; saves a PNG histogram",
        "lint": "errors and warnings with row numbers (exit 1 on errors); the check `ayar train` runs first",
        "preview": "render rows exactly as the model sees them, trained tokens highlighted; writes an HTML file",
        "clean": "exact + near-duplicate removal, PII scrub, length filters; writes a new file and a report",
        "convert": "write the data in another format",
        "stats": "diversity and language mix (no tokenizer needed)",
    }
    for action in ACTIONS:
        sp = sub.add_parser(action, help=helps[action], description=helps[action])
        _inputs(sp, tokens=action in ("inspect", "lint", "preview"))
        if action == "inspect":
            sp.add_argument("--png", default="data-lengths.png", help="where to save the token-length histogram")
            sp.add_argument("--json", action="store_true", help="print the statistics as JSON")
        if action == "lint":
            sp.add_argument("--json", action="store_true", help="print the report as JSON")
        if action == "preview":
            sp.add_argument("-n", type=int, default=3, help="rows to show (default 3)")
            sp.add_argument("--start", type=int, default=0, help="first row to show")
            sp.add_argument("--html", default="data-preview.html", help="HTML file with the same rows")
        if action in ("clean", "convert"):
            sp.add_argument(
                "--out", required=True, help="output file (.jsonl, .json, .parquet or .csv); never an input"
            )
            sp.add_argument("--force", action="store_true", help="replace --out when it exists (never an input)")
            sp.add_argument("--to", dest="to_format", help="output format (clean: default is the input's format)")
        if action == "clean":
            sp.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
            sp.add_argument("--no-near-dup", action="store_true", help="skip MinHash near-duplicate removal")
            sp.add_argument(
                "--threshold", type=float, default=0.85, help="near-duplicate Jaccard threshold (default 0.85)"
            )
            sp.add_argument("--no-pii", action="store_true", help="do not scrub PII")
            sp.add_argument(
                "--pii-names",
                action="store_true",
                help="also replace person names and locations (presidio: the pii extra, pip install -e '.[pii]')",
            )
            sp.add_argument("--min-chars", type=int, default=0, help="drop rows with fewer characters")
            sp.add_argument("--max-chars", type=int, default=0, help="drop rows with more characters")
            sp.add_argument("--keep-empty", action="store_true", help="keep rows whose answer is empty")
            sp.add_argument(
                "--against",
                action="append",
                default=[],
                metavar="FILE",
                help="drop rows that also occur in FILE (e.g. the validation set); repeatable",
            )


def _inputs(sp, tokens: bool) -> None:
    sp.add_argument("sources", nargs="*", help="data files, folders or globs (or sample:gsm8k)")
    sp.add_argument("--config", help="take the data (and model) settings from a training YAML instead")
    sp.add_argument("--format", help="row format (default: detect)")
    sp.add_argument(
        "--columns", help="field renames ours=theirs, comma-separated, e.g. instruction=question,output=answer"
    )
    if tokens:
        sp.add_argument("--val", help="validation file (lint checks leakage between the splits)")
        sp.add_argument(
            "--model", help="model whose tokenizer and chat template to use (default: the config's, or `default`)"
        )
        sp.add_argument("--max-length", type=int, help="token budget per row (default: the config's, or 1024)")
        sp.add_argument("--template", choices=("chat", "alpaca"), help="chat (the model's template) or alpaca")


def run(args) -> int:
    from ayar.cli import data_actions

    return getattr(data_actions, args.action)(args)
