"""The corpus of bad data files (tests/fixtures/bad_data): each one gives a DataError whose message names
the file (and line or row) and says what is wrong, never a traceback."""

import re
from pathlib import Path

import pytest

from ayar.data.dataset import load_records
from ayar.errors import DataError

BAD = Path(__file__).parents[2] / "fixtures" / "bad_data"

# file -> (format, columns, the message, as a regex; the file name is always required too)
CASES = {
    "malformed_line3.jsonl": ("auto", None, r":3: invalid JSON \(Expecting value at column 32\)"),
    "trailing_comma.jsonl": ("auto", None, r":1: invalid JSON .*each line must be one JSON object"),
    "single_quotes.jsonl": ("auto", None, r":1: invalid JSON \(Expecting property name enclosed in double quotes"),
    "list_in_jsonl.jsonl": ("auto", None, r":1: expected a JSON object per line, got list"),
    "array_line.jsonl": ("auto", None, r":2: expected a JSON object per line, got list"),
    "empty.jsonl": ("auto", None, r": the file has no rows"),
    "blank_lines_only.jsonl": ("auto", None, r": the file has no rows"),
    "latin1.jsonl": ("auto", None, r":1: not valid UTF-8 \(byte 20\); re-save the file as UTF-8"),
    "utf16.jsonl": ("auto", None, r":1: not valid UTF-8 .*re-save the file as UTF-8"),
    "missing_output.jsonl": (
        "auto",
        None,
        r"1 of 3 rows .*:2: missing field\(s\) \['output'\] for format 'alpaca'; this row has \['instruction', "
        r"'response'\]",
    ),
    "output_not_string.jsonl": ("auto", None, r":1: field 'output' must be a string, got int"),
    "unknown_fields.jsonl": (
        "auto",
        None,
        r"cannot tell the data format from the fields \['bar', 'foo'\].*Set data.format",
    ),
    "gsm8k_unmapped.jsonl": (
        "auto",
        None,
        r"data.columns, e.g. data.columns: \{instruction: question, output: answer\}",
    ),
    "ambiguous.jsonl": ("auto", None, r"the rows fit several formats \(alpaca, messages\); set data.format"),
    "messages_not_list.jsonl": ("auto", None, r":1: 'messages' must be a non-empty list of \{role, content\} objects"),
    "messages_bad_role.jsonl": (
        "auto",
        None,
        r":1: messages\[0\].role is 'human'; expected one of system, user, assistant",
    ),
    "messages_no_content.jsonl": ("auto", None, r":1: messages\[0\] must be an object with 'role' and 'content'"),
    "messages_no_assistant.jsonl": ("auto", None, r":1: the conversation has no assistant turn"),
    "messages_content_number.jsonl": ("auto", None, r":1: field 'messages\[1\].content' must be a string, got int"),
    "sharegpt_bad_from.jsonl": ("auto", None, r":1: conversations\[0\].from is 'alien'; expected one of system, human"),
    "sharegpt_missing_value.jsonl": ("auto", None, r":1: conversations\[0\] must be an object with 'from' and 'value'"),
    "sharegpt_empty.jsonl": ("auto", None, r":1: 'conversations' must be a non-empty list"),
    "preference_missing_rejected.jsonl": (
        "auto",
        None,
        r":1: missing field\(s\) \['rejected'\] for format 'preference'",
    ),
    "preference_no_common_prompt.jsonl": ("auto", None, r":1: chosen and rejected share no prompt"),
    "hh_not_transcript.jsonl": ("auto", None, r":1: 'rejected' is not an hh transcript: it must start with"),
    "classification_bad_label.jsonl": ("auto", None, r":1: 'label' must be a non-empty string or an integer, got None"),
    "text_not_string.jsonl": ("auto", None, r":1: field 'text' must be a string, got list"),
    "json_not_list.json": ("auto", None, r": expected a JSON list of objects \(or a .jsonl file"),
    "json_syntax.json": ("auto", None, r":2: invalid JSON \(Expecting ',' delimiter at column 22\)"),
    "jsonl_named_json.json": ("auto", None, r":2: invalid JSON \(Extra data.*rename the file to .jsonl"),
    "json_item_not_object.json": ("auto", None, r"\[1\]: expected an object, got str"),
    "csv_extra_values.csv": ("auto", None, r":3: this row has more values than the header has columns"),
    "csv_missing_column.csv": (
        "auto",
        None,
        r":2: missing field\(s\) \['output'\] .*this row has \['answer', 'instruction'\]",
    ),
    "parquet_corrupt.parquet": ("auto", None, r": cannot read parquet"),
    "unsupported.docx": ("auto", None, r": unsupported file type .docx; use one of .jsonl"),
    "alpaca_bad_instances.jsonl": ("auto", None, r":1: instances\[0\] must be an object with 'output'"),
    "alpaca_bad_history.jsonl": ("auto", None, r":1: history\[0\] must be a \[user, assistant\] pair of strings"),
    # the same files read with the wrong settings
    "missing_output.jsonl#format": (
        "sharegpt",
        None,
        r":1: missing field\(s\) \['conversations'\] for format 'sharegpt'; this row has \['instruction', 'output'\]",
    ),
    "gsm8k_unmapped.jsonl#columns": (
        "auto",
        {"instruction": "question", "output": "solution"},
        r"data.columns names field\(s\) \['solution'\] that the rows do not have; they have \['answer', 'question'\]",
    ),
    "missing_output.jsonl#unknown-format": (
        "alpacca",
        None,
        r"unknown data format 'alpacca'; supported: alpaca, messages",
    ),
}


def test_the_corpus_is_complete():
    files = {p.name for p in BAD.iterdir()}
    named = {name.split("#")[0] for name in CASES}
    assert files == named, f"files without a case: {files - named}; cases without a file: {named - files}"
    assert len(files) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_file_gives_a_clear_error(name):
    fmt, columns, pattern = CASES[name]
    path = BAD / name.split("#")[0]
    with pytest.raises(DataError) as err:
        load_records(str(path), fmt, columns)
    message = str(err.value)
    assert "Traceback" not in message
    if "unknown data format" not in message:
        assert path.name in message, message
    assert re.search(pattern, message, re.S), message


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("missing.jsonl", r"data file not found: missing.jsonl"),
        ("nowhere/*.jsonl", r"no file matches the pattern nowhere/\*.jsonl"),
        (
            "someone/some-dataset",
            r"someone/some-dataset, split train: not a local file or folder, and as a hub dataset it needs network",
        ),
        ("sample:nope", r"unknown bundled sample 'nope'; available: sample:gsm8k"),
    ],
)
def test_bad_source_spec(spec, pattern, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=pattern):
        load_records(spec)


def test_empty_folder(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match=r"the folder has no data files \(.jsonl"):
        load_records(str(tmp_path))
