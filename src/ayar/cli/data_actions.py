"""`ayar data ACTION`: each function reads the inputs the same way, calls ayar.data, and prints the result."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ayar.errors import DataError

out = Console(highlight=False, soft_wrap=True)


# --- inputs -----------------------------------------------------------------------------------------


def _data_config(args):
    """A DataConfig (and model name) from --config, or from the sources and flags; flags override the config."""
    from ayar.config import TrainConfig, load_config
    from ayar.config.schema import DataConfig

    if args.config:
        cfg = load_config(args.config)
        data, model = cfg.data, cfg.model.name
        if args.sources:
            data.train = args.sources if len(args.sources) > 1 else args.sources[0]
    else:
        if not args.sources:
            raise DataError("give data files (or --config with a training YAML); e.g. ayar data lint train.jsonl")
        data, model = (
            DataConfig(train=args.sources if len(args.sources) > 1 else args.sources[0], val_ratio=0.0),
            TrainConfig().model.name,
        )
    if args.format:
        data.format = args.format
    if args.columns:
        data.columns = _parse_columns(args.columns)
    for flag, key in (("val", "validation"), ("max_length", "max_length"), ("template", "template")):
        if getattr(args, flag, None) is not None:
            setattr(data, key, getattr(args, flag))
    if getattr(args, "model", None):
        model = args.model
    return data, model


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


def _all_rows(data):
    """Every row of the training sources, unsplit and unmixed (clean and convert keep all rows)."""
    from ayar.data.dataset import load_records, parse_sources

    return [r for src in parse_sources(data.train, data.format, data.columns) for r in load_records(src)]


def _renderer(data, model: str):
    from ayar.data.render import Renderer
    from ayar.models.load import load_tokenizer, resolve_model_path

    path = resolve_model_path(model, log=lambda m: out.print(m))
    return Renderer.from_config(load_tokenizer(path), data)


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
    from ayar.data.dataset import encode_and_lint

    data, model = _data_config(args)
    _, _, report, _ = encode_and_lint(_splits(data), _renderer(data, model), data.cache)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        out.print(report.format() if report.issues else f"clean: {report.summary()}")
    return 1 if report.errors else 0


def preview(args) -> int:
    from ayar.data.preview import boundary_lines, rich_text, write_html

    data, model = _data_config(args)
    records = _splits(data).train[args.start : args.start + args.n]
    renderer = _renderer(data, model)
    examples = [renderer.encode(r) for r in records]
    for ex in examples:
        out.rule(
            f"{ex.where}  ({len(ex.input_ids)} tokens, {ex.n_trained} trained{', truncated' if ex.truncated else ''})"
        )
        out.print(rich_text(renderer.tok, ex))
        for line in boundary_lines(renderer.tok, ex):
            out.print(line)
    out.rule()
    out.print("[bold black on green]highlighted[/]: trained tokens;  [dim]dim[/]: masked (context only)")
    out.print(f"html: {write_html(renderer.tok, examples, args.html)}")
    return 0


def clean(args) -> int:
    from ayar.data.clean import CleanOptions
    from ayar.data.clean import clean as run_clean
    from ayar.data.dataset import load_records
    from ayar.data.writers import write_records

    data, _ = _data_config(args)
    _refuse_overwrite(args, data)
    records = _all_rows(data)
    against = [r for f in args.against for r in load_records(f, data.format, data.columns)]
    opts = CleanOptions(
        dedup=not args.no_dedup,
        near_dup=not args.no_near_dup,
        near_threshold=args.threshold,
        pii=not args.no_pii,
        pii_names=args.pii_names,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        drop_empty=not args.keep_empty,
        against=against,
    )
    cleaned, report = run_clean(records, opts)
    fmt = args.to_format or _input_format(data)
    path = write_records(cleaned, fmt, args.out)
    report_path = path.with_name(path.name + ".report.json")
    report_path.write_text(
        json.dumps({"input": data.train, "output": str(path), "format": fmt, **report.to_dict()}, indent=1)
    )
    out.print(report.format())
    out.print(f"wrote {path} ({fmt}) and {report_path}")
    return 0


def convert(args) -> int:
    from ayar.data.writers import write_records

    if not args.to_format:
        raise DataError("convert needs --to FORMAT (alpaca, messages, sharegpt, preference, hh, text, classification)")
    data, _ = _data_config(args)
    _refuse_overwrite(args, data)
    records = _all_rows(data)
    path = write_records(records, args.to_format, args.out)
    out.print(f"wrote {len(records)} rows to {path} ({args.to_format})")
    return 0


def _refuse_overwrite(args, data) -> None:
    """Inputs are never written, by any route: --out may not be an input file (a file, a folder's file, a glob's
    match, a --config source, an --against file), nor a new file inside an input folder or matching an input
    glob (the next read of that input would take it in). An existing output needs --force."""
    import fnmatch

    from ayar.data.dataset import parse_sources
    from ayar.data.sources import is_glob, local_files

    target = Path(args.out).expanduser().resolve()
    specs = [src.path for src in parse_sources(data.train, data.format, data.columns)]
    specs += [s for s in (data.validation, data.test) if s] + list(getattr(args, "against", []))
    for spec in specs:
        spec = str(spec)
        if any(f.resolve() == target for f in local_files(spec)):
            raise DataError(
                f"--out {args.out} is an input file ({spec}); inputs are never modified: write to a new file"
            )
        root = Path(spec).expanduser()
        if (root.is_dir() and target.is_relative_to(root.resolve())) or (
            is_glob(spec)
            and fnmatch.fnmatch(str(target), str(root.resolve()) if root.is_absolute() else str(Path.cwd() / root))
        ):
            raise DataError(
                f"--out {args.out} is inside the input {spec}: the next read of it would take in the "
                "output; write it somewhere else"
            )
    if target.exists() and not getattr(args, "force", False):
        raise DataError(f"--out {args.out} exists: pass --force to replace it, or choose a new file")


def _input_format(data) -> str:
    """The format of the (first) input, for writing cleaned data back in kind."""
    from ayar.data.dataset import parse_sources
    from ayar.data.formats import detect_format, map_columns
    from ayar.data.sources import read_rows

    src = parse_sources(data.train, data.format, data.columns)[0]
    if src.format != "auto":
        return src.format
    rows = read_rows(src.path)[:20]
    return detect_format(map_columns(rows, src.columns) if src.columns else rows)
