"""`ayar data ACTION`: each function reads the inputs the same way, calls ayar.data, and prints the result."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

from ayar.errors import DataError

out = Console(highlight=False, soft_wrap=True)


# --- inputs -----------------------------------------------------------------------------------------


def _api_inputs(args) -> tuple:
    """The data inputs of `ayar data ACTION` as (source, keyword arguments) of ayar.api's data functions."""
    if not args.config and not args.sources:
        raise DataError("give data files (or --config with a training YAML); e.g. ayar data lint train.jsonl")
    sources = args.sources or None
    return sources[0] if sources and len(sources) == 1 else sources, dict(
        config=args.config,
        model=getattr(args, "model", None),
        format=args.format,
        columns=_parse_columns(args.columns) if args.columns else None,
        validation=getattr(args, "val", None),
        max_length=getattr(args, "max_length", None),
        template=getattr(args, "template", None),
    )


def _data_config(args):
    """(DataConfig, model name) from --config and/or the sources; flags override the config."""
    from ayar import api

    source, inputs = _api_inputs(args)
    return api.data_config(source, **inputs)


def _parse_columns(text: str) -> dict:
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in pairs if p.count("=") != 1]
    if bad:
        raise DataError(
            f"--columns takes ours=theirs pairs separated by commas, e.g. instruction=question,output=answer; got {bad}"
        )
    return dict(p.split("=") for p in pairs)


def _splits(data):
    from ayar.data.dataset import load_splits

    return load_splits(data)


def _renderer(data, model: str):
    from ayar import api

    return api._renderer(data, model, log=lambda m: out.print(m))


def _encode(records, renderer, data):
    from ayar.data.cache import encode_cached

    return encode_cached(records, renderer, data.cache)[0]


# --- actions ----------------------------------------------------------------------------------------


def inspect(args) -> int:
    from ayar.data.render import stop_token_ids
    from ayar.data.stats import describe, histogram_png

    data, model = _data_config(args)
    splits = _splits(data)
    renderer = _renderer(data, model)
    stops = stop_token_ids(renderer.tok)
    result = {}
    for name, records in splits.as_dict().items():
        if name == "test":
            continue
        result[name] = describe(records, _encode(records, renderer, data), data.max_length, stops)
    lengths = result["train"]["tokens"].pop("lengths")
    for r in result.values():
        r["tokens"].pop("lengths", None)
    png = histogram_png(lengths, data.max_length, args.png, title=f"token lengths: {data.train}")
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for name, st in result.items():
        _print_stats(name, st)
    out.print(f"histogram: {png}")
    return 0


def _print_stats(name: str, st: dict) -> None:
    t = st["tokens"]
    table = Table(
        title=f"{name}: {st['rows']} rows ({', '.join(f'{n} {k}' for k, n in st['kinds'].items())})", show_header=False
    )
    table.add_row(
        "tokens per row",
        f"min {t['min']}  p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  max {t['max']}  mean {t['mean']}",
    )
    table.add_row("total tokens", f"{t['total']:,} ({t['trained']:,} trained)")
    over = f"{t['over_max_length']} rows" + (
        f", by {t['over_by_mean']} tokens on average (max {t['over_by_max']})" if t["over_max_length"] else ""
    )
    table.add_row(f"over max_length {t['max_length']}", over)
    if t["eos_share"] is not None:
        table.add_row("ends with EOS/end-of-turn", f"{100 * t['eos_share']:.1f}% of rows")
    table.add_row("empty fields", ", ".join(f"{k}: {v}" for k, v in st["empty_fields"].items()) or "none")
    _diversity_rows(table, st)
    out.print(table)


def _diversity_rows(table: Table, st: dict) -> None:
    d = st["diversity"]
    table.add_row("languages", ", ".join(f"{k} {100 * v:.0f}%" for k, v in st["languages"].items()))
    table.add_row("distinct-1 / distinct-2", f"{d['distinct_1']} / {d['distinct_2']} (answers)")
    table.add_row("leading verbs", ", ".join(f"{w} ({n})" for w, n in d["leading_verbs"]) or "-")
    table.add_row("topic words", ", ".join(f"{w} ({n})" for w, n in d["top_topic_words"][:10]) or "-")
    table.add_row(
        "topic spread", f"{d['topic_spread']} (normalized entropy of the 50 commonest prompt words; 1 = even)"
    )


def stats(args) -> int:
    from ayar.data.stats import diversity, empty_fields, languages

    data, _ = _data_config(args)
    for name, records in _splits(data).as_dict().items():
        st = {"rows": len(records), "languages": languages(records), "diversity": diversity(records)}
        table = Table(
            title=f"{name}: {len(records)} rows; empty fields: {empty_fields(records) or 'none'}", show_header=False
        )
        _diversity_rows(table, st)
        out.print(table)
    return 0


def lint(args) -> int:
    from ayar import api

    source, inputs = _api_inputs(args)
    report = api.lint(source, **inputs)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        out.print(report.format() if report.issues else f"clean: {report.summary()}")
    return 1 if report.errors else 0


def preview(args) -> int:
    from ayar import api
    from ayar.data.preview import boundary_lines, rich_text

    source, inputs = _api_inputs(args)
    examples = api.preview(source, n=args.n, start=args.start, html=args.html, **inputs)
    renderer = api._renderer(*api.data_config(source, **inputs))
    for ex in examples:
        out.rule(
            f"{ex.where}  ({len(ex.input_ids)} tokens, {ex.n_trained} trained{', truncated' if ex.truncated else ''})"
        )
        out.print(rich_text(renderer.tok, ex))
        for line in boundary_lines(renderer.tok, ex):
            out.print(line)
    out.rule()
    out.print("[bold black on green]highlighted[/]: trained tokens;  [dim]dim[/]: masked (context only)")
    out.print(f"html: {args.html}")
    return 0


def clean(args) -> int:
    from ayar import api

    source, inputs = _api_inputs(args)
    result = api.clean(
        source,
        out=args.out,
        to=args.to_format,
        force=args.force,
        against=args.against,
        dedup=not args.no_dedup,
        near_dup=not args.no_near_dup,
        near_threshold=args.threshold,
        pii=not args.no_pii,
        pii_names=args.pii_names,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        drop_empty=not args.keep_empty,
        **inputs,
    )
    out.print(result.report.format())
    out.print(f"wrote {result.path} ({result.format}) and {result.report_path}")
    return 0


def convert(args) -> int:
    from ayar import api

    if not args.to_format:
        raise DataError("convert needs --to FORMAT (alpaca, messages, sharegpt, preference, hh, text, classification)")
    source, inputs = _api_inputs(args)
    path = api.convert(source, to=args.to_format, out=args.out, force=args.force, **inputs)
    out.print(f"wrote {path} ({args.to_format})")
    return 0
