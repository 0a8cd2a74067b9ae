"""Round trips (hypothesis): rows written by ayar's writers (jsonl, json, parquet, csv) read back unchanged, with
newlines, quotes, separators, Unicode line separators, very long fields, missing optional fields and mixed types;
and records written in each format load back as the same conversations."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ayar.data.formats import to_records
from ayar.data.sources import Row, read_rows
from ayar.data.writers import write_records, write_rows
from tests.reliability import count

# every character but lone surrogates (not encodable as UTF-8), weighted toward the ones that break readers
TRICKY = ["\n", "\r", "\r\n", '"', "'", ",", ";", "\t", "\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\\", "{"]
text = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    st.lists(st.sampled_from(TRICKY) | st.text(max_size=3), max_size=12).map("".join),
)
nonempty = text.filter(lambda t: t.strip() != "")
scalar = st.one_of(text, st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.booleans(), st.none())
json_value = st.recursive(
    scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8
)
# rows as users have them: some fields only in some rows, a field a string in one row and a list in another
row = st.dictionaries(
    st.sampled_from(["instruction", "input", "output", "system", "history", "prompt", "x y", "é"]),
    json_value,
    max_size=6,
)
text_row = st.dictionaries(
    st.sampled_from(["instruction", "input", "output", "system", "note, with comma"]), text, max_size=5
)

EXAMPLES = int(os.environ.get("AYAR_FUZZ_EXAMPLES", "150"))  # make test-reliability: thousands
LONG = "x" * 200_000 + "\n" + "y" * 10


def _roundtrip(rows, suffix):
    count(f"round trips: rows through {suffix}")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_rows(rows, Path(tmp) / f"data{suffix}")
        if not rows:
            return
        back = [r.data for r in read_rows(str(path))]
    assert back == rows


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(row, min_size=1, max_size=5))
@example(rows=[{"instruction": "a"}, {"instruction": "b", "system": "s", "history": [["u", "a"]]}])
@example(rows=[{"prompt": "plain"}, {"prompt": [{"role": "user", "content": "listed"}]}])
@example(rows=[{"output": LONG}])
@example(rows=[{"output": "l1\u2028l2\u0085l3"}])
def test_rows_survive_write_and_read(suffix, rows):
    _roundtrip(rows, suffix)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(text_row, min_size=1, max_size=5))
@example(rows=[{"instruction": "l1\nl2", "output": 'say "hi", then\r\nleave'}])
@example(rows=[{"output": LONG}])
def test_text_rows_survive_csv(rows):
    """CSV cells are text: rows of strings come back as written; a field a row lacks comes back empty."""
    count("round trips: rows through .csv")
    names = list(dict.fromkeys(k for r in rows for k in r))
    if not names:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = write_rows(rows, Path(tmp) / "data.csv")
        back = [r.data for r in read_rows(str(path))]
    assert back == [{k: r.get(k, "") for k in names} for r in rows]


def test_csv_refuses_what_it_cannot_hold(tmp_path):
    from ayar.errors import DataError

    with pytest.raises(DataError, match="CSV cells hold text only"):
        write_rows([{"instruction": "a", "history": [["u", "a"]]}], tmp_path / "d.csv")


turn = st.tuples(nonempty, nonempty)
conversation = st.builds(
    lambda system, turns: (
        ([{"role": "system", "content": system}] if system else [])
        + [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    ),
    st.none() | nonempty,
    st.lists(turn, min_size=1, max_size=3),
)


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "completion"])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@settings(max_examples=EXAMPLES // 3, deadline=None, suppress_health_check=list(HealthCheck))
@given(convs=st.lists(conversation, min_size=1, max_size=4))
def test_chat_records_survive_every_format(fmt, suffix, convs):
    count(f"round trips: records as {fmt} through {suffix}")
    records = to_records([Row({"messages": c}, f"mem:{i}") for i, c in enumerate(convs)], "messages")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_records(records, fmt, Path(tmp) / f"d{suffix}")
        back = to_records(read_rows(str(path)), fmt)
    assert [r.conversation() for r in back] == [r.conversation() for r in records]
