"""Record -> a row of a named format, and writing rows to .jsonl / .json / .parquet (for `ayar data convert/clean`)."""

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
    "preference": _preference,
    "hh": _hh,
    "text": _text,
    "classification": _classification,
}
_ACCEPTS = {
    "messages": ("chat", "preference", "classification"),
    "sharegpt": ("chat", "preference", "classification"),
    "alpaca": ("chat", "preference", "classification"),
    "preference": ("preference",),
    "hh": ("preference",),
    "text": ("text", "classification"),
    "classification": ("classification",),
}


def write_rows(rows: list[dict], out: str | Path) -> Path:
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix == ".jsonl":
        write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    elif suffix == ".json":
        write_atomic(out, json.dumps(rows, ensure_ascii=False, indent=1) + "\n")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(out)
    else:
        raise DataError(f"{out}: write to a .jsonl, .json or .parquet file")
    return out


def write_records(records: list[Record], fmt: str, out: str | Path) -> Path:
    return write_rows([to_row(r, fmt) for r in records], out)
