"""Read rows from local files. Every row carries its location (file:line) for error messages."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

from ayar.errors import DataError

SAMPLES = {"gsm8k": "gsm8k_sample.jsonl", "gsm8k-heldout": "gsm8k_heldout.jsonl"}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    data: dict
    where: str  # "path:line" (jsonl/csv) or "path[index]" (json/parquet)


def resolve_source(spec: str) -> Path:
    """A file path, or `sample:NAME` for a dataset bundled in the package."""
    if spec.startswith("sample:"):
        name = spec.removeprefix("sample:")
        if name not in SAMPLES:
            raise DataError(f"unknown bundled sample {name!r}; available: {', '.join('sample:' + s for s in SAMPLES)}")
        return Path(str(resources.files("ayar.data") / "samples" / SAMPLES[name]))
    if not spec:
        raise DataError("no training data given: set data.train to a .jsonl/.json/.csv/.parquet file (or sample:gsm8k)")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {spec}")
    if path.is_dir():
        raise DataError(f"{spec} is a directory: point data.train at a file ({', '.join(SUFFIXES)})")
    return path


def read_rows(spec: str) -> list[Row]:
    path = resolve_source(spec)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
    if suffix == ".parquet":
        rows = list(_read_parquet(path))
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix]
        rows = list(reader(path, text))
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


def _read_jsonl(path: Path, text: str) -> Iterator[Row]:
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
        yield Row(obj, f"{path}:{n}")


def _read_json(path: Path, text: str) -> Iterator[Row]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]}
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of objects (or a .jsonl file with one object per line)")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{path}[{i}]: expected an object, got {type(item).__name__}")
        yield Row(item, f"{path}[{i}]")


def _read_csv(path: Path, text: str) -> Iterator[Row]:
    reader = csv.DictReader(text.splitlines())
    for i, rec in enumerate(reader):
        yield Row(dict(rec), f"{path}:{reader.line_num}")


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet: {e}") from None
    for i, rec in enumerate(table.to_pylist()):
        yield Row(rec, f"{path}[{i}]")
