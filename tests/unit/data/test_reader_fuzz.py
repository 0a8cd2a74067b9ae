"""Fuzz (hypothesis): every reader and format given arbitrary JSON values per field, arbitrary role sequences
and turn orders, and arbitrary bytes. The only allowed outcomes are records or a DataError that names the file
(and the line or row): never another exception."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ayar.data.dataset import load_records
from ayar.errors import DataError
from tests.reliability import count

EXAMPLES = int(os.environ.get("AYAR_FUZZ_EXAMPLES", "150"))  # make test-reliability: thousands
FORMATS = ["auto", "alpaca", "messages", "sharegpt", "preference", "hh", "text", "classification"]
FIELDS = [
    "instruction",
    "input",
    "output",
    "system",
    "history",
    "instances",
    "messages",
    "conversations",
    "prompt",
    "chosen",
    "rejected",
    "text",
    "label",
    "role",
    "content",
    "from",
    "value",
]

scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10))
value = st.recursive(
    scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3),
    max_leaves=10,
)
role = st.sampled_from(["system", "user", "assistant", "human", "gpt", "tool", "", "User"])
turn = st.fixed_dictionaries({"role": role, "content": st.one_of(st.text(max_size=8), st.none(), st.integers())})
sharegpt_turn = st.fixed_dictionaries({"from": role, "value": st.one_of(st.text(max_size=8), st.none())})
row = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), value, max_size=5),
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=5)}),
    st.fixed_dictionaries({"conversations": st.lists(sharegpt_turn, max_size=5)}),
    st.fixed_dictionaries(
        {
            "prompt": st.text(max_size=8) | st.lists(turn, max_size=3),
            "chosen": st.text(max_size=8) | st.lists(turn, max_size=2),
            "rejected": st.text(max_size=8) | st.lists(turn, max_size=2),
        }
    ),
    st.fixed_dictionaries({"chosen": st.text(max_size=30), "rejected": st.text(max_size=30)}),
)


def _load(path: Path, fmt: str):
    try:
        return load_records(str(path), fmt)
    except DataError as e:
        assert str(path) in str(e), str(e)
        return None


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(row, min_size=1, max_size=4))
def test_arbitrary_rows_in_every_format(fmt, rows):
    count(f"fuzzed data files: {fmt} rows")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        _load(path, fmt)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt", ".parquet"])
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_arbitrary_bytes_in_every_reader(suffix, blob):
    count(f"fuzzed data files: bytes as {suffix}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{suffix}"
        path.write_bytes(blob)
        _load(path, "auto")
