"""Every named format maps to the one internal Record; sources (folders, globs, saved datasets, .txt),
column mapping, mixing with weights and splits. Real data: excerpts of ../shared/data in tests/fixtures."""

import json
from pathlib import Path

import pytest

from ayar.config.schema import DataConfig
from ayar.data.dataset import load_records, load_splits, mix
from ayar.data.formats import detect_format, to_records
from ayar.data.sources import Row, read_rows
from ayar.data.writers import to_row, write_records
from ayar.errors import DataError
from tests.helpers import write_jsonl

FIX = Path(__file__).parents[2] / "fixtures" / "shared"
GSM8K = str(FIX / "gsm8k_train.jsonl")
GSM8K_COLUMNS = {"instruction": "question", "output": "answer"}


def test_gsm8k_through_a_column_mapping():
    recs = load_records(GSM8K, columns=GSM8K_COLUMNS)
    assert len(recs) == 300 and all(r.kind == "chat" for r in recs)
    assert recs[0].messages[0]["role"] == "user" and recs[0].messages[1]["content"].rstrip().split("\n")[-1].startswith(
        "####"
    )
    assert recs[0].where.endswith("gsm8k_train.jsonl:1")
    with pytest.raises(DataError, match=r"data.columns, e.g. data.columns: \{instruction: question, output: answer\}"):
        load_records(GSM8K)


def test_alpaca_seed_tasks_expand_their_nested_instances():
    recs = load_records(str(FIX / "alpaca_seed_tasks.jsonl"))
    rows = [json.loads(line) for line in (FIX / "alpaca_seed_tasks.jsonl").read_text().splitlines()]
    assert len(recs) == sum(len(r["instances"]) for r in rows)
    first = rows[1]  # antonym_relation: instruction + non-empty input
    rec = recs[1]
    assert rec.messages[0]["content"] == f"{first['instruction']}\n\n{first['instances'][0]['input']}"
    assert rec.messages[1]["content"] == first["instances"][0]["output"]
    assert rec.where.endswith("alpaca_seed_tasks.jsonl:2#0")


def test_hh_transcripts_become_prompt_chosen_rejected():
    recs = load_records(str(FIX / "hh_harmless_pairs.jsonl"))
    assert detect_format(read_rows(str(FIX / "hh_harmless_pairs.jsonl"))) == "hh"
    assert len(recs) == 63 and all(r.kind == "preference" for r in recs)
    first = json.loads((FIX / "hh_harmless_pairs.jsonl").read_text().splitlines()[0])
    r = recs[0]
    assert r.messages[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert r.messages[-1]["role"] == "user" and len(r.chosen) == len(r.rejected) == 1
    assert r.chosen[0]["role"] == "assistant" and r.chosen[0]["content"] != r.rejected[0]["content"]
    assert first["chosen"].endswith(r.chosen[0]["content"]) and first["rejected"].endswith(r.rejected[0]["content"])


def test_hh_round_trips_through_preference_and_back(tmp_path):
    recs = load_records(str(FIX / "hh_harmless_pairs.jsonl"))
    write_records(recs, "preference", tmp_path / "pairs.jsonl")
    again = load_records(str(tmp_path / "pairs.jsonl"))
    assert detect_format(read_rows(str(tmp_path / "pairs.jsonl"))) == "preference"
    assert [r.payload() for r in again] == [r.payload() for r in recs]
    write_records(recs, "hh", tmp_path / "hh.jsonl")
    assert [r.payload() for r in load_records(str(tmp_path / "hh.jsonl"))] == [r.payload() for r in recs]


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        {
            "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
        },  # implicit prompt
    ],
)
def test_preference_plain_messages_and_implicit_prompt(row):
    rec = to_records([Row(row, "p:1")])[0]
    assert rec.messages == [{"role": "user", "content": "2+2?"}]
    assert rec.chosen == [{"role": "assistant", "content": "4"}] and rec.rejected == [
        {"role": "assistant", "content": "5"}
    ]
    assert rec.conversation()[-1]["content"] == "4"  # SFT on a preference row trains on the chosen answer


def test_text_and_classification(tmp_path):
    (tmp_path / "corpus.txt").write_text("first line\n\nsecond line\n")
    recs = load_records(str(tmp_path / "corpus.txt"))
    assert [r.text for r in recs] == ["first line", "second line"] and recs[1].where.endswith("corpus.txt:3")
    assert all(r.kind == "text" for r in recs)
    cls = load_records(
        str(write_jsonl(tmp_path / "c.jsonl", [{"text": "great film", "label": "pos"}, {"text": "dull", "label": 0}]))
    )
    assert [(r.kind, r.label) for r in cls] == [("classification", "pos"), ("classification", "0")]
    assert to_row(cls[0], "messages") == {
        "messages": [{"role": "user", "content": "great film"}, {"role": "assistant", "content": "pos"}]
    }


def test_sharegpt_with_system_and_openai_content_parts(tmp_path):
    share = to_records(
        [
            Row(
                {
                    "system": "Be terse.",
                    "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}],
                },
                "s:1",
            )
        ]
    )[0]
    assert [m["role"] for m in share.messages] == ["system", "user", "assistant"]
    parts = to_records(
        [
            Row(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                        {"role": "assistant", "content": "yo"},
                    ]
                },
                "m:1",
            )
        ]
    )[0]
    assert parts.messages[0]["content"] == "hi"


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca"])
def test_chat_formats_convert_into_each_other(fmt, tmp_path):
    recs = load_records(GSM8K, columns=GSM8K_COLUMNS)[:20]
    out = write_records(recs, fmt, tmp_path / f"out.{fmt}.jsonl")
    again = load_records(str(out))
    assert [r.messages for r in again] == [r.messages for r in recs]


def test_multi_turn_alpaca_uses_history(tmp_path):
    rec = to_records(
        [
            Row(
                {
                    "messages": [
                        {"role": "system", "content": "S"},
                        {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"},
                        {"role": "assistant", "content": "d"},
                    ]
                },
                "m:1",
            )
        ]
    )[0]
    row = to_row(rec, "alpaca")
    assert row == {"instruction": "c", "input": "", "output": "d", "system": "S", "history": [["a", "b"]]}
    assert to_records([Row(row, "a:1")])[0].messages == rec.messages


def test_incompatible_conversion_names_the_row_and_what_fits():
    rec = load_records(GSM8K, columns=GSM8K_COLUMNS)[0]
    with pytest.raises(
        DataError,
        match=(
            r"gsm8k_train.jsonl:1: a chat row cannot be written as 'preference'; it can be written as messages, "
            r"sharegpt, alpaca"
        ),
    ):
        to_row(rec, "preference")


def test_folder_glob_and_saved_dataset(tmp_path):
    import datasets

    d = tmp_path / "parts"
    d.mkdir()
    write_jsonl(d / "b.jsonl", [{"instruction": "b", "output": "2"}])
    write_jsonl(d / "a.jsonl", [{"instruction": "a", "output": "1"}])
    (d / "README.md").write_text("not data")
    assert [r.messages[0]["content"] for r in load_records(str(d))] == ["a", "b"]  # sorted by path
    assert len(load_records(str(d / "*.jsonl"))) == 2
    ds = datasets.Dataset.from_list([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}])
    ds.save_to_disk(str(tmp_path / "saved"))
    recs = load_records(str(tmp_path / "saved"), columns=GSM8K_COLUMNS)
    assert [r.messages[1]["content"] for r in recs] == ["a1", "a2"] and recs[1].where.endswith("saved[1]")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_records(str(tmp_path / "dd"), columns=GSM8K_COLUMNS)) == 2


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"val_ratio": 0.0, **kw})


def test_splits_by_ratio_are_seeded_and_disjoint():
    cfg = _cfg(train=GSM8K, columns=GSM8K_COLUMNS, val_ratio=0.1, test_ratio=0.2)
    a, b = load_splits(cfg, seed=3), load_splits(cfg, seed=3)
    assert (len(a.train), len(a.val), len(a.test)) == (210, 30, 60)
    assert [r.where for r in a.val] == [r.where for r in b.val]
    wheres = [set(r.where for r in s) for s in (a.train, a.val, a.test)]
    assert not (wheres[0] & wheres[1] or wheres[0] & wheres[2] or wheres[1] & wheres[2])
    assert [r.where for r in load_splits(cfg, seed=4).val] != [r.where for r in a.val]


def test_split_by_file(tmp_path):
    cfg = _cfg(train="sample:gsm8k", validation="sample:gsm8k-heldout", test="sample:gsm8k-heldout", val_ratio=0.5)
    s = load_splits(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (200, 20, 20)  # a validation file disables the ratio


def test_mixing_with_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    s = load_splits(_cfg(train=[{"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}]), seed=0)
    kinds = [r.kind for r in s.train]
    assert len(kinds) == 40 and kinds.count("chat") == 10 and kinds.count("text") == 30  # b repeated 3x
    plain = load_splits(_cfg(train=[str(a), str(b)]))
    assert len(plain.train) == 40 and [r.kind for r in plain.train].count("text") == 10
    assert mix([[1, 2], [3]], [None, None], 0) == [1, 2, 3]


def test_per_source_format_and_bad_source_entries(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"q": "x", "a": "y"}])
    s = load_splits(_cfg(train=[{"path": str(a), "format": "alpaca", "columns": {"instruction": "q", "output": "a"}}]))
    assert s.train[0].messages[1]["content"] == "y"
    with pytest.raises(DataError, match=r"data.train\[0\]: unknown key\(s\) \['wieght'\]"):
        load_splits(_cfg(train=[{"path": str(a), "wieght": 2}]))
    with pytest.raises(DataError, match=r"data.train\[0\].weight must be a positive number"):
        load_splits(_cfg(train=[{"path": str(a), "weight": -1}]))


def test_trl_prompt_completion_rows_are_detected(tmp_path):
    """TRL's prompt-completion format (strings or message lists) is detected and trains the completion."""
    from ayar.data.dataset import load_records

    rows = [
        {"prompt": "What is 2+2?", "completion": "4"},
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello."}],
        },
    ]
    recs = load_records(str(write_jsonl(tmp_path / "c.jsonl", rows)))
    assert [r.conversation() for r in recs] == [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ],
    ]
