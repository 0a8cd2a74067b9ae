"""Reading data files: every bad input is a DataError naming the file (and line) and the fix."""

import pytest

from ayar.data.dataset import load_records, split_by_ratio
from ayar.data.sources import read_rows
from ayar.errors import DataError
from tests.helpers import write_jsonl


def test_formats_map_to_one_internal_form(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"}])
    msgs = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]}],
    )
    share = write_jsonl(
        tmp_path / "s.jsonl",
        [{"conversations": [{"from": "human", "value": "Add\n\n2 and 3"}, {"from": "gpt", "value": "5"}]}],
    )
    forms = [load_records(str(p))[0].messages for p in (alpaca, msgs, share)]
    assert forms[0] == forms[1] == forms[2]


def test_json_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text('[{"instruction": "q", "output": "a"}]')
    (tmp_path / "a.csv").write_text("instruction,output\nq,a\n")
    pq.write_table(pa.table({"instruction": ["q"], "output": ["a"]}), tmp_path / "a.parquet")
    for name in ("a.json", "a.csv", "a.parquet"):
        assert load_records(str(tmp_path / name))[0].messages[1]["content"] == "a"


def test_bundled_sample():
    convs = load_records("sample:gsm8k")
    assert len(convs) == 200 and "####" in convs[0].messages[-1]["content"]


@pytest.mark.parametrize(
    "content,fmt,pattern",
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n',
            "auto",
            r"bad.jsonl:2: invalid JSON",
        ),
        (
            '{"instruction": "a"}\n',
            "alpaca",
            r"bad.jsonl:1: missing field\(s\) \['output'\] .* this row has \['instruction'\]",
        ),
        ('{"foo": 1}\n', "auto", r"cannot tell the data format from the fields \['foo'\]"),
        (
            '{"instruction": "a", "output": "b"}\n',
            "yaml",
            r"unknown data format 'yaml'; supported: alpaca, messages, sharegpt",
        ),
        ("", "auto", r"bad.jsonl: the file has no rows"),
        ("[1, 2]\n", "auto", r"bad.jsonl:1: expected a JSON object per line"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', "auto", r"messages\[0\].role is 'robot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}\n', "auto", r"no assistant turn"),
        ('{"conversations": [{"from": "alien", "value": "x"}]}\n', "auto", r"conversations\[0\].from is 'alien'"),
        ('{"instruction": 3, "output": "b"}\n', "auto", r"field 'instruction' must be a string"),
    ],
)
def test_bad_input_messages(tmp_path, content, fmt, pattern):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_records(str(tmp_path / "bad.jsonl"), fmt)


def test_non_utf8_and_missing_and_wrong_type(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes('{"instruction": "caf\u00e9", "output": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.jsonl:1: not valid UTF-8"):
        read_rows(str(tmp_path / "latin.jsonl"))
    with pytest.raises(DataError, match="data file not found"):
        read_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "x.docx").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type .docx"):
        read_rows(str(tmp_path / "x.docx"))
    with pytest.raises(DataError, match="unknown bundled sample"):
        read_rows("sample:nope")


def test_split_is_seeded_and_disjoint():
    items = list(range(100))
    a_train, a_val = split_by_ratio(items, 0.1, seed=1)
    b_train, b_val = split_by_ratio(items, 0.1, seed=1)
    assert a_val == b_val and len(a_val) == 10 and not set(a_val) & set(a_train)
    assert split_by_ratio(items, 0.1, seed=2)[1] != a_val


def test_a_hub_dataset_spec_passes_subset_split_and_revision_to_datasets(monkeypatch):
    """No hub here: `datasets.load_dataset` is replaced by one that records its arguments."""
    import datasets

    from ayar import hub
    from ayar.config import load_config
    from ayar.data.dataset import load_splits

    calls = []

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list([{"question": f"q{i} {split}", "answer": f"#### {i}"} for i in range(10)])

    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = load_config(
        None,
        [
            "data.train=[{path: openai/gsm8k, name: main, split: train, revision: e53f048}]",
            "data.validation={path: openai/gsm8k, name: main, split: test}",
            "data.columns={instruction: question, output: answer}",
        ],
    )
    splits = load_splits(cfg.data)
    assert calls == [("openai/gsm8k", "main", "train", "e53f048"), ("openai/gsm8k", "main", "test", None)]
    assert len(splits.train) == len(splits.val) == 10 and splits.val[0].messages[0]["content"] == "q0 test"


def test_a_hub_dataset_without_network_fails_at_once_naming_subset_and_split(monkeypatch):
    import datasets

    def never(*a, **k):  # what would spend minutes on connection retries
        raise AssertionError("datasets.load_dataset was called without network")

    monkeypatch.setattr(datasets, "load_dataset", never)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"openai/gsm8k \(main\), split test: .*needs network.*save_to_disk") as err:
        read_rows("openai/gsm8k", {"name": "main", "split": "test"})
    assert "Traceback" not in str(err.value)


@pytest.mark.parametrize(
    "item, pattern",
    [
        ({"path": "sample:gsm8k", "split": "test"}, r"split only apply to hub datasets"),
        ({"path": "openai/gsm8k", "name": ["main"]}, r"data.train\[0\].name must be a string"),
        ({"path": "openai/gsm8k", "subset": "main"}, r"unknown key\(s\) \['subset'\]; allowed: .*name, split"),
    ],
)
def test_bad_hub_specs_are_data_errors(item, pattern, monkeypatch):
    from ayar.data.dataset import load_records, parse_sources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=pattern):
        load_records(parse_sources([item])[0])
