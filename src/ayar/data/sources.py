"""Read rows from a source: a file, a folder, a glob, a `datasets.save_to_disk` folder, a bundled sample,
or a hub dataset (where there is network). Every row carries its location for error messages."""

from __future__ import annotations

import csv
import glob
import io
import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

from ayar.errors import DataError

SAMPLES = {
    "gsm8k": "gsm8k_sample.jsonl",
    "gsm8k-heldout": "gsm8k_heldout.jsonl",
    "anchor": "anchor_alpaca_seed.jsonl",
    "hh": "hh_harmless_sample.jsonl",
    "hh-heldout": "hh_harmless_heldout.jsonl",
}
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Row:
    data: dict
    where: str  # "path:line" (jsonl/csv/txt) or "path[index]" (json/parquet/saved datasets)


def read_rows(spec: str, hub: dict | None = None) -> list[Row]:
    """All rows of one source spec, in a stable order (files of a folder or glob sorted by path). `hub`:
    `{name, split, revision}` of a hub dataset (`name` is its subset, e.g. GSM8K's `main`)."""
    hub = {k: v for k, v in (hub or {}).items() if v is not None}
    if hub and (spec.startswith("sample:") or Path(spec).expanduser().exists() or not _looks_like_hub_id(spec)):
        raise DataError(
            f"{spec}: {', '.join(sorted(hub))} only apply to hub datasets (`owner/name`); for a local file or folder "
            "leave them out"
        )
    if hub:
        return _read_hub(spec, **hub)
    if not spec:
        raise DataError("no data given: set data.train to a file, folder or glob (or sample:gsm8k)")
    if spec.startswith("sample:"):
        return _read_file(_sample(spec.removeprefix("sample:")))
    path = Path(spec).expanduser()
    if is_glob(spec):
        files = local_files(spec)
        if not files:
            raise DataError(f"no file matches the pattern {spec}")
        return _read_files(files, spec)
    if path.is_dir():
        if any((path / m).is_file() for m in _SAVED_MARKERS):
            return _read_saved(path)
        files = local_files(spec)
        if not files:
            raise DataError(f"{spec}: the folder has no data files ({', '.join(SUFFIXES)})")
        return _read_files(files, spec)
    if path.is_file():
        return _read_file(path)
    if _looks_like_hub_id(spec):
        return _read_hub(spec)
    raise DataError(f"data file not found: {spec}")


def is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def local_files(spec: str) -> list[Path]:
    """The local files a source spec reads (a file; a folder's data files, or every file of a saved dataset;
    a glob's matches), sorted; [] for bundled samples and hub datasets."""
    if not spec or spec.startswith("sample:"):
        return []
    path = Path(spec).expanduser()
    if is_glob(spec):
        return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if path.is_dir():
        saved = any((path / m).is_file() for m in _SAVED_MARKERS)
        return sorted(p for p in path.rglob("*") if p.is_file() and (saved or p.suffix.lower() in SUFFIXES))
    return [path] if path.is_file() else []


def _sample(name: str) -> Path:
    if name not in SAMPLES:
        raise DataError(f"unknown bundled sample {name!r}; available: {', '.join('sample:' + s for s in SAMPLES)}")
    return Path(str(resources.files("ayar.data") / "samples" / SAMPLES[name]))


def _read_files(files: list[Path], spec: str) -> list[Row]:
    rows = []
    for f in files:
        if f.suffix.lower() in SUFFIXES:
            rows += _read_file(f)
    if not rows:
        raise DataError(f"{spec}: no rows in {len(files)} matching file(s) ({', '.join(SUFFIXES)} are read)")
    return rows


def _read_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
    if suffix == ".parquet":
        rows = list(_read_parquet(path))
    else:
        try:  # bytes decoded as they are: no newline translation, a \r inside a CSV cell stays a \r
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".txt": _read_txt}[suffix]
        rows = list(reader(path, text))
    if not rows:
        raise DataError(f"{path}: the file has no rows")
    return rows


def _lines(text: str) -> list[str]:
    """Lines split on \n only (a CRLF line loses its \r): str.splitlines() also splits on U+2028, U+0085 and
    other characters that JSON strings may hold raw, which broke rows ayar itself had written."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _read_jsonl(path: Path, text: str) -> Iterator[Row]:
    for n, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = (
                " (a .json file with one list? rename it to .json)" if n == 1 and line.lstrip().startswith("[") else ""
            )
            raise DataError(
                f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object{hint}"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
        yield Row(obj, f"{path}:{n}")


def _read_json(path: Path, text: str) -> Iterator[Row]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line? rename the file to .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}){hint}") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]}
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list of objects (or a .jsonl file with one object per line)")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise DataError(f"{path}[{i}]: expected an object, got {type(item).__name__}")
        yield Row(item, f"{path}[{i}]")


def _read_csv(path: Path, text: str) -> Iterator[Row]:
    # the csv module sees the text whole, so a quoted cell keeps its newlines; cells of any length
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        reader.fieldnames  # reads the header line now, so line numbers below count from it
    except csv.Error as e:
        raise DataError(f"{path}:1: not valid CSV ({e})") from None
    while True:
        start = reader.line_num + 1  # a row's first line (a quoted newline makes it span several)
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(
                f"{path}:{start}: not valid CSV ({e}); quote cells that hold commas, quotes or newlines"
            ) from None
        if None in rec:
            raise DataError(
                f"{path}:{start}: this row has more values than the header has columns "
                f"({reader.fieldnames}); quote values that contain commas"
            )
        yield Row(dict(rec), f"{path}:{start}")


def _read_txt(path: Path, text: str) -> Iterator[Row]:
    for n, line in enumerate(_lines(text), start=1):
        if line.strip():
            yield Row({"text": line}, f"{path}:{n}")


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: cannot read parquet: {e}") from None
    meta = table.schema.metadata or {}
    as_json = set(json.loads(meta.get(b"ayar.json_columns", b"[]")))  # written by ayar (data/writers.py)
    records = table.to_pylist()
    if not table.num_columns and b"ayar.rows" in meta:  # rows with no fields: only the count was kept
        records = [{} for _ in range(int(meta[b"ayar.rows"]))]
    for i, rec in enumerate(records):
        for name in as_json & set(rec):
            if rec[name] is None:
                del rec[name]  # a field this row did not have
            else:
                rec[name] = json.loads(rec[name])
        yield Row(rec, f"{path}[{i}]")


def _read_saved(path: Path) -> list[Row]:
    """A folder written by `datasets.save_to_disk` (a Dataset, or a DatasetDict's `train` split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: cannot read this saved dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(
                f"{path}: a saved DatasetDict with splits {list(ds)} and no 'train'; point at one split's folder, "
                f"e.g. {path / next(iter(ds))}"
            )
        path, ds = path / "train", ds["train"]
    rows = [Row(rec, f"{path}[{i}]") for i, rec in enumerate(ds)]
    if not rows:
        raise DataError(f"{path}: the saved dataset has no rows")
    return rows


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (
        len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and Path(spec).suffix.lower() not in SUFFIXES
    )


def _read_hub(path: str, name: str | None = None, split: str = "train", revision: str | None = None) -> list[Row]:
    from ayar.hub import hub_reachable

    what = f"{path}" + (f" ({name})" if name else "") + f", split {split}" + (f" at {revision}" if revision else "")
    if not hub_reachable():
        raise DataError(
            f"{what}: not a local file or folder, and as a hub dataset it needs network, which this machine "
            "does not have. Download it where there is network "
            "(datasets.load_dataset(...).save_to_disk(DIR), or export it to .jsonl) and pass that instead."
        )
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split, revision=revision)
    except Exception as e:
        raise DataError(
            f"cannot load hub dataset {what}: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}"
        ) from None
    return [Row(rec, f"{path}[{i}]") for i, rec in enumerate(ds)]
