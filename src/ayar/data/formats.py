"""Named row schemas, each mapped to the one internal form (Record).

    alpaca          instruction, [input], output, [system], [history]; or instruction + instances[{input, output}]
    messages        messages: [{role, content}]  (OpenAI chat)
    sharegpt        conversations: [{from, value}], [system]
    preference      prompt, chosen, rejected: strings, or lists of {role, content} (prompt may be implicit)
    hh              chosen, rejected: Anthropic "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts
    text            text  (continued pretraining; .txt files give one row per non-empty line)
    classification  text, label

`columns` renames fields before anything else, for data in its own schema:
`columns: {instruction: question, output: answer}` reads GSM8K as alpaca.
"""

from __future__ import annotations

from ayar.data.records import Record
from ayar.data.sources import Row
from ayar.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
FORMATS = ("alpaca", "messages", "sharegpt", "completion", "preference", "hh", "text", "classification")
_MAX_LISTED = 8  # row problems listed in one error message


def to_records(rows: list[Row], fmt: str = "auto", columns: dict | None = None) -> list[Record]:
    """Convert rows; every row problem is collected and reported in one error naming the rows."""
    if columns:
        rows = map_columns(rows, columns)
    if fmt == "auto":
        fmt = detect_format(rows)
    if fmt not in _CONVERTERS:
        raise DataError(f"unknown data format {fmt!r}; supported: {', '.join(FORMATS)}")
    records, problems = [], []
    for row in rows:
        try:
            records.extend(_CONVERTERS[fmt](row))
        except DataError as e:
            problems.append(str(e))
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(
            f"{len(problems)} of {len(rows)} rows are not valid {fmt!r} rows:\n{listed}{more}\n"
            "Fix these rows, set data.format to the right format, or rename fields with data.columns."
        )
    return records


def map_columns(rows: list[Row], columns: dict) -> list[Row]:
    """Rename fields: `columns` maps our field name -> the name in the user's data."""
    present = set().union(*(r.data for r in rows[:100]))
    missing = [src for src in columns.values() if src not in present]
    if missing:
        raise DataError(
            f"{_file(rows)}: data.columns names field(s) {missing} that the rows do not have; "
            f"they have {sorted(present)}"
        )
    out = []
    for r in rows:
        data = {k: v for k, v in r.data.items() if k not in columns.values()}
        data.update({ours: r.data[theirs] for ours, theirs in columns.items() if theirs in r.data})
        out.append(Row(data, r.where))
    return out


def detect_format(rows: list[Row]) -> str:
    """The format most of the first rows fit (by their field names); the converter then names any row that
    does not fit it, with the fields it has."""
    sample = rows[:50]
    votes = {name: sum(1 for r in sample if matches(r.data)) for name, matches in _DETECT.items()}
    best = max(votes.values())
    found = [name for name, n in votes.items() if n == best]
    if best and len(found) == 1:
        return found[0]
    keys = sorted(set().union(*(r.data for r in sample)))
    if not best:
        hint = _columns_hint(keys)
        raise DataError(
            f"{_file(rows)}: cannot tell the data format from the fields {keys}. Supported formats: "
            "alpaca (instruction, output), messages (messages), sharegpt (conversations), completion (prompt, "
            "completion: TRL's), preference (prompt, chosen, "
            "rejected), hh (chosen, rejected transcripts), text (text), classification (text, label). "
            f"Set data.format, or map your fields with data.columns{hint}."
        )
    raise DataError(f"{_file(rows)}: the rows fit several formats ({', '.join(found)}); set data.format to one of them")


def _columns_hint(keys: list[str]) -> str:
    prompt = next((k for k in ("question", "prompt", "query", "input", "problem") if k in keys), None)
    answer = next((k for k in ("answer", "response", "completion", "output", "solution") if k in keys), None)
    if prompt and answer and prompt != answer:
        return f", e.g. data.columns: {{instruction: {prompt}, output: {answer}}}"
    return ""


# --- converters: Row -> list[Record] (one row may hold several examples, e.g. alpaca instances) ---------


def _alpaca(row: Row) -> list[Record]:
    d = row.data
    if "instances" in d and "output" not in d:
        _require(row, ("instruction",), "alpaca")
        if not isinstance(d["instances"], list) or not d["instances"]:
            raise DataError(f"{row.where}: 'instances' must be a non-empty list of {{input, output}} objects")
        out = []
        for i, inst in enumerate(d["instances"]):
            if not isinstance(inst, dict) or "output" not in inst:
                raise DataError(f"{row.where}: instances[{i}] must be an object with 'output' (and optional 'input')")
            sub = Row({**{k: v for k, v in d.items() if k != "instances"}, **inst}, f"{row.where}#{i}")
            out += _alpaca(sub)
        return out
    _require(row, ("instruction", "output"), "alpaca")
    instruction, inp, output = d["instruction"], d.get("input") or "", d["output"]
    for name, value in (("instruction", instruction), ("input", inp), ("output", output)):
        _string(row, name, value)
    messages = []
    if d.get("system"):
        messages.append({"role": "system", "content": _string(row, "system", d["system"])})
    for i, pair in enumerate(d.get("history") or []):  # LLaMA-Factory style [[user, assistant], ...]
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{row.where}: history[{i}] must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return [Record(messages, row.where)]


def _messages(row: Row) -> list[Record]:
    _require(row, ("messages",), "messages")
    return [_chat(Record(_turns(row, "messages", row.data["messages"]), row.where))]


def _sharegpt(row: Row) -> list[Record]:
    _require(row, ("conversations",), "sharegpt")
    turns = row.data["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{row.where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    messages = []
    if row.data.get("system"):
        messages.append({"role": "system", "content": _string(row, "system", row.data["system"])})
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"{row.where}: conversations[{i}] must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise DataError(
                f"{row.where}: conversations[{i}].from is {t['from']!r}; expected one of {', '.join(SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": _string(row, f"conversations[{i}].value", t["value"])})
    return [_chat(Record(messages, row.where))]


def _completion(row: Row) -> list[Record]:
    """TRL's prompt-completion rows: `prompt` and `completion`, each a string or a list of messages."""
    _require(row, ("prompt", "completion"), "completion")
    d = row.data
    prompt = _as_turns(row, "prompt", d["prompt"], "user")
    completion = _as_turns(row, "completion", d["completion"], "assistant")
    return [_chat(Record(prompt + completion, row.where))]


def _preference(row: Row) -> list[Record]:
    _require(row, ("chosen", "rejected"), "preference")
    d = row.data
    if "prompt" in d:
        prompt = _as_turns(row, "prompt", d["prompt"], "user")
        chosen = _as_turns(row, "chosen", d["chosen"], "assistant")
        rejected = _as_turns(row, "rejected", d["rejected"], "assistant")
    else:  # implicit prompt: two full conversations sharing their beginning
        chosen = _turns(row, "chosen", d["chosen"])
        rejected = _turns(row, "rejected", d["rejected"])
        prompt, chosen, rejected = _split_common(row, chosen, rejected)
    return [_pair(row, prompt, chosen, rejected)]


def _hh(row: Row) -> list[Record]:
    _require(row, ("chosen", "rejected"), "hh")
    chosen = _parse_hh(row, "chosen", row.data["chosen"])
    rejected = _parse_hh(row, "rejected", row.data["rejected"])
    prompt, chosen, rejected = _split_common(row, chosen, rejected)
    return [_pair(row, prompt, chosen, rejected)]


def _text(row: Row) -> list[Record]:
    _require(row, ("text",), "text")
    return [Record([], row.where, text=_string(row, "text", row.data["text"]))]


def _classification(row: Row) -> list[Record]:
    _require(row, ("text", "label"), "classification")
    label = row.data["label"]
    if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
        raise DataError(f"{row.where}: 'label' must be a non-empty string or an integer, got {label!r}")
    return [Record([], row.where, text=_string(row, "text", row.data["text"]), label=str(label))]


# --- helpers -------------------------------------------------------------------------------------

_HH_TURN = {"Human": "user", "Assistant": "assistant"}


def _parse_hh(row: Row, name: str, text) -> list[dict]:
    import re

    _string(row, name, text)
    parts = re.split(r"\n\n(Human|Assistant): ?", text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(
            f"{row.where}: {name!r} is not an hh transcript: it must start with '\\n\\nHuman: ' "
            "and alternate '\\n\\nHuman: ' / '\\n\\nAssistant: ' turns"
        )
    return [
        {"role": _HH_TURN[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])
    ]


def _split_common(row: Row, chosen: list[dict], rejected: list[dict]):
    """Shared leading turns -> prompt; the rest are the two continuations (each must be assistant turns)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":  # the continuation starts with the assistant's reply
        n -= 1
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    if not prompt:
        raise DataError(f"{row.where}: chosen and rejected share no prompt (they must start with the same user turn)")
    if not c or not r:
        raise DataError(f"{row.where}: chosen and rejected are identical, so there is no preference to learn")
    return prompt, c, r


def _pair(row: Row, prompt, chosen, rejected) -> Record:
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if any(m["role"] != "assistant" for m in turns):
            raise DataError(f"{row.where}: {name!r} must continue the prompt with assistant turns only")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{row.where}: the prompt must end with a user turn (the answers continue it)")
    return Record(prompt, row.where, chosen=chosen, rejected=rejected)


def _as_turns(row: Row, name: str, value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else _turns(row, name, value)


def _turns(row: Row, name: str, turns) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{row.where}: {name!r} must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "role" not in t or "content" not in t:
            raise DataError(f"{row.where}: {name}[{i}] must be an object with 'role' and 'content'")
        if t["role"] not in ROLES:
            raise DataError(f"{row.where}: {name}[{i}].role is {t['role']!r}; expected one of {', '.join(ROLES)}")
        content = t["content"]
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        messages.append({"role": t["role"], "content": _string(row, f"{name}[{i}].content", content)})
    return messages


def _chat(rec: Record) -> Record:
    if not any(m["role"] == "assistant" for m in rec.messages):
        raise DataError(f"{rec.where}: the conversation has no assistant turn, so nothing would be trained")
    return rec


def _string(row: Row, name: str, value) -> str:
    if not isinstance(value, str):
        raise DataError(f"{row.where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _require(row: Row, fields: tuple, fmt: str) -> None:
    missing = [f for f in fields if f not in row.data]
    if missing:
        raise DataError(f"{row.where}: missing field(s) {missing} for format {fmt!r}; this row has {sorted(row.data)}")


def _file(rows: list[Row]) -> str:
    return rows[0].where.rsplit(":", 1)[0].split("[")[0] if rows else "data"


def _is_hh(text) -> bool:
    return isinstance(text, str) and text.lstrip(" ").startswith("\n\nHuman:")


# Detection looks at field names only; the converters check the values and name the rows that are wrong.
_DETECT = {
    "alpaca": lambda d: "instruction" in d,
    "messages": lambda d: "messages" in d,
    "sharegpt": lambda d: "conversations" in d,
    "completion": lambda d: "prompt" in d and "completion" in d and "chosen" not in d,
    "preference": lambda d: "chosen" in d and ("rejected" in d or "prompt" in d) and not _is_hh(d["chosen"]),
    "hh": lambda d: "prompt" not in d and (_is_hh(d.get("chosen")) or _is_hh(d.get("rejected"))),
    "text": lambda d: "text" in d and "label" not in d,
    "classification": lambda d: "text" in d and "label" in d,
}
_CONVERTERS = {
    "alpaca": _alpaca,
    "messages": _messages,
    "sharegpt": _sharegpt,
    "completion": _completion,
    "preference": _preference,
    "hh": _hh,
    "text": _text,
    "classification": _classification,
}
