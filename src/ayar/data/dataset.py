"""From a DataConfig to training-ready examples: sources -> records -> splits -> mix -> encode (cached) -> lint.

`data.train` is one source or a list of them; each source is a string or
`{path: ..., weight: 0.3, format: alpaca, columns: {...}}`. Each source is split on its own (so a row
repeated by mixing can never land in both train and validation), then the training parts are mixed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ayar.data.cache import encode_cached
from ayar.data.formats import FORMATS, to_records
from ayar.data.lint import LintReport, lint
from ayar.data.records import Record
from ayar.data.render import Example, Renderer, stop_token_ids
from ayar.data.sources import read_rows
from ayar.errors import DataError

_SOURCE_KEYS = ("path", "weight", "format", "columns", "name", "split", "revision")
_HUB_KEYS = ("name", "split", "revision")  # a hub dataset's subset, split (default train) and commit/tag


@dataclass
class Source:
    path: str
    weight: float | None = None
    format: str = "auto"
    columns: dict | None = None
    hub: dict | None = None  # {name, split, revision} of a hub dataset


@dataclass
class Splits:
    train: list[Record]
    val: list[Record] = field(default_factory=list)
    test: list[Record] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[Record]]:
        return {
            name: recs for name, recs in (("train", self.train), ("validation", self.val), ("test", self.test)) if recs
        }


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    stats: dict = field(default_factory=dict)
    lint: LintReport | None = None


def parse_sources(value, fmt: str = "auto", columns: dict | None = None, field: str = "data.train") -> list[Source]:
    """`data.train` (or `data.validation` / `data.test`): a spec, a mapping, or a list of them."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise DataError("data.train is an empty list: give at least one file, folder or glob")
    out = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]" if isinstance(value, list) else field
        if isinstance(item, str):
            out.append(Source(item, None, fmt, columns or None))
            continue
        if not isinstance(item, dict) or "path" not in item:
            raise DataError(
                f"{where}: expected a path string or a mapping with 'path' (and optional weight, format, "
                "columns; name, split, revision for a hub dataset)"
            )
        unknown = sorted(set(item) - set(_SOURCE_KEYS), key=str)
        if unknown:
            raise DataError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(_SOURCE_KEYS)}")
        weight = item.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0):
            raise DataError(f"{where}.weight must be a positive number, got {weight!r}")
        src_fmt = item.get("format", fmt)
        if src_fmt not in ("auto",) + FORMATS:
            raise DataError(f"{where}.format {src_fmt!r} is not one of auto, {', '.join(FORMATS)}")
        hub = {k: item[k] for k in _HUB_KEYS if item.get(k) is not None}
        bad = [k for k, v in hub.items() if not isinstance(v, (str, int)) or isinstance(v, bool)]
        if bad:
            raise DataError(f"{where}.{bad[0]} must be a string, got {hub[bad[0]]!r}")
        hub = {k: str(v) for k, v in hub.items()}
        out.append(Source(str(item["path"]), weight, src_fmt, item.get("columns", columns) or None, hub or None))
    return out


def load_records(
    source: Source | str, fmt: str = "auto", columns: dict | None = None, max_rows: int | None = None
) -> list[Record]:
    if isinstance(source, str):
        source = Source(source, None, fmt, columns)
    rows = read_rows(source.path, source.hub)
    if max_rows:
        rows = rows[:max_rows]
    return to_records(rows, source.format, source.columns)


def load_splits(data_cfg, seed: int = 42) -> Splits:
    sources = parse_sources(data_cfg.train, data_cfg.format, data_cfg.columns)
    val_ratio = 0.0 if data_cfg.validation else data_cfg.val_ratio
    test_ratio = 0.0 if data_cfg.test else data_cfg.test_ratio
    if val_ratio + test_ratio >= 1:
        raise DataError(f"data.val_ratio + data.test_ratio must be below 1, got {val_ratio} + {test_ratio}")
    parts, val, test = [], [], []
    for src in sources:
        records = load_records(src, max_rows=data_cfg.max_rows)
        rest, held_test = split_by_ratio(records, test_ratio, seed)
        train, held_val = split_by_ratio(rest, val_ratio / (1 - test_ratio) if val_ratio else 0.0, seed)
        parts.append(train)
        val += held_val
        test += held_test
    train = mix(parts, [s.weight for s in sources], seed)
    for name in ("validation", "test"):  # a file or hub split of its own, instead of rows held out of train
        spec = getattr(data_cfg, name)
        if spec:
            held = [load_records(s) for s in parse_sources(spec, data_cfg.format, data_cfg.columns, f"data.{name}")]
            val, test = (sum(held, []), test) if name == "validation" else (val, sum(held, []))
    if not train:
        raise DataError(
            "no training rows left after holding out validation/test rows; lower data.val_ratio / data.test_ratio"
        )
    return Splits(train, val, test)


def prepare_data(data_cfg, tokenizer, seed: int = 42, log=None) -> PreparedData:
    """Encode the train and validation splits (through the cache) and lint them; refuse on lint errors
    unless data.lint is `warn` or `off`."""
    renderer = Renderer.from_config(tokenizer, data_cfg)
    splits = load_splits(data_cfg, seed)
    train, val, report, train_cached = encode_and_lint(
        splits, renderer, data_cfg.cache, run_lint=data_cfg.lint != "off"
    )
    if report is not None:
        enforce_lint(report, data_cfg.lint, log)
    dropped = sum(1 for e in train + val if e.n_trained == 0)
    train = [e for e in train if e.n_trained]
    val = [e for e in val if e.n_trained]
    if not train:
        raise DataError(
            "no training row has a token to train (all prompts fill data.max_length, or the answers are empty)"
        )
    stats = {
        "train_rows": len(train),
        "val_rows": len(val),
        "test_rows": len(splits.test),
        "train_tokens": sum(len(e.input_ids) for e in train),
        "trained_tokens": sum(e.n_trained for e in train),
        "truncated_rows": sum(e.truncated for e in train + val),
        "dropped_rows": dropped,
        "max_length": data_cfg.max_length,
        "tokenization_cached": train_cached,
    }
    return PreparedData(train, val, stats, report)


def enforce_lint(report, mode: str, log=None) -> None:
    """`data.lint`: `strict` refuses to train on lint errors; otherwise the issues are reported."""
    if report.errors and mode == "strict":
        raise DataError(
            f"the data has problems that would spoil training:\n{report.format()}\n"
            "Fix them (see `ayar data lint`), or train anyway with data.lint=warn."
        )
    if log and report.issues:
        log(report.format(per_code=3))


def encode_and_lint(splits: Splits, renderer: Renderer, cache: bool = True, run_lint: bool = True):
    """Encode train and validation (through the cache) and lint every split: the check `ayar train` runs
    first and `ayar data lint` shows. Returns (train, validation examples, report or None, train was cached)."""
    train, train_cached = encode_cached(splits.train, renderer, cache)
    val, _ = encode_cached(splits.val, renderer, cache)
    report = None
    if run_lint:
        report = lint(
            splits.as_dict(), {"train": train, "validation": val}, renderer.max_length, stop_token_ids(renderer.tok)
        )
    return train, val, report, train_cached


def mix(parts: list[list[Record]], weights: list[float | None], seed: int) -> list[Record]:
    """Concatenate, or with weights: each source's share of the mixed set (of the same total size) is its
    weight / sum of weights; a source is subsampled or repeated (whole copies + a seeded sample) to fit."""
    if all(w is None for w in weights) or len(parts) == 1:
        return [r for p in parts for r in p]
    w = [1.0 if x is None else float(x) for x in weights]
    total = sum(len(p) for p in parts)
    rng = random.Random(seed)
    out = []
    for part, wi in zip(parts, w):
        want = round(total * wi / sum(w))
        if not part:
            continue
        whole, rest = divmod(want, len(part))
        out += part * whole + rng.sample(part, rest)
    return out


def split_by_ratio(items: list, ratio: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then hold out round(n * ratio) items (at least one when ratio > 0 and n > 1)."""
    if ratio <= 0 or len(items) < 2:
        return list(items), []
    if ratio >= 1:
        raise DataError(f"data.val_ratio must be below 1, got {ratio}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(len(items) - 1, max(1, round(len(items) * ratio)))
    val_idx = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]
