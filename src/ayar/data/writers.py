"""Record -> a row of a named format; rows written to .jsonl, .json, .parquet or .csv (ayar data convert, clean)."""

from __future__ import annotations

import json
from pathlib import Path

from ayar.data.records import Record
from ayar.errors import DataError
from ayar.fsutil import write_atomic

_SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}
_HH_SPEAKER = {"user": "Human", "assistant": "Assistant"}


def to_row(rec: Record, fmt: str) -> dict:
    if fmt not in _WRITERS:
        raise DataError(f"cannot write format {fmt!r}; choose one of {', '.join(_WRITERS)}")
    return _WRITERS[fmt](rec)


def _messages(rec: Record) -> dict:
    _need(rec, ("chat", "preference", "classification"), "messages")
    return {"messages": rec.conversation()}


def _sharegpt(rec: Record) -> dict:
    _need(rec, ("chat", "preference", "classification"), "sharegpt")
    return {"conversations": [{"from": _SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in rec.conversation()]}


def _alpaca(rec: Record) -> dict:
    _need(rec, ("chat", "preference", "classification"), "alpaca")
    turns = rec.conversation()
    system = [m["content"] for m in turns if m["role"] == "system"]
    rest = [m for m in turns if m["role"] != "system"]
    pairs = list(zip(rest[0::2], rest[1::2]))
    if len(rest) % 2 or any(u["role"] != "user" or a["role"] != "assistant" for u, a in pairs) or len(system) > 1:
        raise DataError(
            f"{rec.where}: alpaca needs alternating user/assistant turns (and at most one system turn); write it "
            "as messages"
        )
    row = {"instruction": pairs[-1][0]["content"], "input": "", "output": pairs[-1][1]["content"]}
    if system:
        row["system"] = system[0]
    if len(pairs) > 1:
        row["history"] = [[u["content"], a["content"]] for u, a in pairs[:-1]]
    return row


def _completion(rec: Record) -> dict:
    """TRL's prompt-completion: the turns before the last assistant answer, and that answer."""
    _need(rec, ("chat", "preference", "classification"), "completion")
    turns = rec.conversation()
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{rec.where}: completion rows end with an assistant answer; write it as messages")
    prompt, answer = turns[:-1], turns[-1]["content"]
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return {"prompt": prompt[0]["content"], "completion": answer}
    return {"prompt": prompt, "completion": [turns[-1]]}


def _preference(rec: Record) -> dict:
    _need(rec, ("preference",), "preference")
    single = lambda turns, role: len(turns) == 1 and turns[0]["role"] == role
    if single(rec.messages, "user") and single(rec.chosen, "assistant") and single(rec.rejected, "assistant"):
        return {
            "prompt": rec.messages[0]["content"],
            "chosen": rec.chosen[0]["content"],
            "rejected": rec.rejected[0]["content"],
        }
    return {"prompt": rec.messages, "chosen": rec.chosen, "rejected": rec.rejected}


def _hh(rec: Record) -> dict:
    _need(rec, ("preference",), "hh")
    if any(m["role"] == "system" for m in rec.messages):
        raise DataError(f"{rec.where}: hh transcripts have no system turn; write it as preference")
    text = lambda turns: "".join(f"\n\n{_HH_SPEAKER[m['role']]}: {m['content']}" for m in turns)
    return {"chosen": text(rec.messages + rec.chosen), "rejected": text(rec.messages + rec.rejected)}


def _text(rec: Record) -> dict:
    _need(rec, ("text", "classification"), "text")
    return {"text": rec.text}


def _classification(rec: Record) -> dict:
    _need(rec, ("classification",), "classification")
    return {"text": rec.text, "label": rec.label}


def _need(rec: Record, kinds: tuple, fmt: str) -> None:
    if rec.kind not in kinds:
        fits = [f for f, k in _ACCEPTS.items() if rec.kind in k]
        raise DataError(
            f"{rec.where}: a {rec.kind} row cannot be written as {fmt!r}; it can be written as {', '.join(fits)}"
        )


_WRITERS = {
    "messages": _messages,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "completion": _completion,
    "preference": _preference,
    "hh": _hh,
    "text": _text,
    "classification": _classification,
}
_ACCEPTS = {
    "messages": ("chat", "preference", "classification"),
    "sharegpt": ("chat", "preference", "classification"),
    "alpaca": ("chat", "preference", "classification"),
    "completion": ("chat", "preference", "classification"),
    "preference": ("preference",),
    "hh": ("preference",),
    "text": ("text", "classification"),
    "classification": ("classification",),
}


def write_rows(rows: list[dict], out: str | Path) -> Path:
    """Rows to .jsonl, .json, .parquet or .csv, atomically; what is read back is what was written."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".jsonl":
        write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif suffix == ".json":
        write_atomic(out, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        pq.write_table(parquet_table(rows), tmp)
        tmp.replace(out)
    elif suffix == ".csv":
        write_atomic(out, _csv_text(rows, out))
    else:
        raise DataError(f"{out}: write to a .jsonl, .json, .parquet or .csv file")
    return out


JSON_COLUMNS = b"ayar.json_columns"  # parquet metadata: columns stored as JSON text (read back decoded)
ROWS = b"ayar.rows"


def parquet_table(rows: list[dict]):
    """A table with every field of every row (not only the first row's). A column keeps arrow's own type when
    its values come back unchanged through it; one that would not (mixed strings and lists, dicts with
    differing keys, which arrow fills with nulls) is stored as JSON text and listed in the file's metadata,
    so the reader decodes it: no field is lost, added or changed."""
    import pyarrow as pa

    names = list(dict.fromkeys(k for r in rows for k in r))
    arrays, as_json = [], []
    for name in names:
        values = [r.get(name) for r in rows]
        missing = [name not in r for r in rows]
        array = None
        if not any(missing):  # a column some rows lack: JSON, so that "absent" stays absent (not null)
            try:
                array = pa.array(values)
                if array.to_pylist() != values or not _parquet_writable(array.type):
                    array = None
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                array = None
        if array is None:
            as_json.append(name)
            array = pa.array(
                [None if m else json.dumps(v, ensure_ascii=False) for v, m in zip(values, missing)], type=pa.string()
            )
        arrays.append(array)
    table = pa.table(dict(zip(names, arrays))) if names else pa.table({})
    # the row count too: rows with no fields at all make a table with no columns, which holds no rows
    return table.replace_schema_metadata({JSON_COLUMNS: json.dumps(as_json).encode(), ROWS: str(len(rows)).encode()})


def _parquet_writable(t) -> bool:
    """Parquet cannot store a struct without fields (what a column of empty objects becomes in arrow)."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        return t.num_fields > 0 and all(_parquet_writable(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _parquet_writable(t.value_type)
    return True


def _csv_text(rows: list[dict], out: Path) -> str:
    """CSV holds text cells: rows whose values are all strings (a missing field is an empty cell)."""
    import csv
    import io

    names = list(dict.fromkeys(k for r in rows for k in r))
    for i, r in enumerate(rows):
        bad = next((k for k, v in r.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(
                f"{out}: row {i + 1}'s field {bad!r} is a {type(r[bad]).__name__}, and CSV cells hold text only: "
                "write .jsonl or .parquet (or a format whose fields are text, e.g. --to messages to .jsonl)"
            )
    buf = io.StringIO(newline="")
    # CRLF line ends (RFC 4180): a cell holding a \r or a \n is then quoted, so it reads back whole
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_records(records: list[Record], fmt: str, out: str | Path) -> Path:
    return write_rows([to_row(r, fmt) for r in records], out)
