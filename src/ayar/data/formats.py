"""Named row schemas, each mapped to the one internal form: a Conversation (a list of role/content turns)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ayar.data.sources import Row
from ayar.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant"}


@dataclass
class Conversation:
    messages: list[dict] = field(default_factory=list)  # [{"role": ..., "content": ...}]
    where: str = ""


def detect_format(rows: list[Row]) -> str:
    keys = set(rows[0].data)
    found = [name for name, required in _SIGNATURES.items() if required <= keys]
    if len(found) == 1:
        return found[0]
    where = rows[0].where.rsplit(":", 1)[0]
    if not found:
        raise DataError(
            f"{where}: cannot tell the data format from the fields {sorted(keys)}; expected one of: "
            "alpaca (instruction, output), messages (messages), sharegpt (conversations). Set data.format explicitly."
        )
    raise DataError(f"{where}: rows match several formats ({', '.join(found)}); set data.format to one of them")


def to_conversations(rows: list[Row], fmt: str) -> list[Conversation]:
    if fmt == "auto":
        fmt = detect_format(rows)
    if fmt not in _CONVERTERS:
        raise DataError(f"unknown data format {fmt!r}; supported: {', '.join(_CONVERTERS)}")
    return [_CONVERTERS[fmt](row) for row in rows]


def _alpaca(row: Row) -> Conversation:
    d = row.data
    _require(row, ("instruction", "output"), "alpaca")
    instruction, inp, out = d["instruction"], d.get("input") or "", d["output"]
    for name, value in (("instruction", instruction), ("input", inp), ("output", out)):
        if not isinstance(value, str):
            raise DataError(f"{row.where}: field {name!r} must be a string, got {type(value).__name__}")
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    if d.get("system"):
        messages.insert(0, {"role": "system", "content": str(d["system"])})
    return Conversation(messages, row.where)


def _messages(row: Row) -> Conversation:
    _require(row, ("messages",), "messages")
    turns = row.data["messages"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{row.where}: 'messages' must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "role" not in t or "content" not in t:
            raise DataError(f"{row.where}: messages[{i}] must be an object with 'role' and 'content'")
        if t["role"] not in ROLES:
            raise DataError(f"{row.where}: messages[{i}].role is {t['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(t["content"], str):
            raise DataError(f"{row.where}: messages[{i}].content must be a string")
        messages.append({"role": t["role"], "content": t["content"]})
    return _checked(Conversation(messages, row.where))


def _sharegpt(row: Row) -> Conversation:
    _require(row, ("conversations",), "sharegpt")
    turns = row.data["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{row.where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"{row.where}: conversations[{i}] must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise DataError(f"{row.where}: conversations[{i}].from is {t['from']!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": str(t["value"])})
    return _checked(Conversation(messages, row.where))


def _checked(conv: Conversation) -> Conversation:
    if not any(m["role"] == "assistant" for m in conv.messages):
        raise DataError(f"{conv.where}: the conversation has no assistant turn, so nothing would be trained")
    return conv


def _require(row: Row, fields: tuple, fmt: str) -> None:
    missing = [f for f in fields if f not in row.data]
    if missing:
        raise DataError(
            f"{row.where}: missing field(s) {missing} for format {fmt!r}; this row has {sorted(row.data)}. "
            "Fix the row, or set data.format to the right format."
        )


_SIGNATURES = {"alpaca": {"instruction", "output"}, "messages": {"messages"}, "sharegpt": {"conversations"}}
_CONVERTERS = {"alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt}
