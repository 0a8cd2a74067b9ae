"""Lint finds each problem with its row; `ayar train` refuses to start on lint errors unless told to."""

import re
from pathlib import Path

import pytest

from ayar.data.dataset import load_records
from ayar.data.formats import to_records
from ayar.data.lint import lint
from ayar.data.records import Record
from ayar.data.render import Renderer, stop_token_ids
from ayar.data.sources import Row
from ayar.errors import DataError
from tests.helpers import MATH_ROWS, make_tokenizer, tiny_train_config, write_jsonl

FIX = Path(__file__).parents[2] / "fixtures" / "shared"


def chat(user, answer, where):
    return Record([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], where)


def run_lint(train, val=(), max_length=64):
    tok = make_tokenizer("qwen2")
    r = Renderer(tok, max_length=max_length)
    splits = {"train": list(train), "validation": list(val)}
    examples = {k: [r.encode(x) for x in v] for k, v in splits.items()}
    return lint(splits, examples, max_length, stop_token_ids(tok))


def codes(report):
    return sorted((i.code, i.where) for i in report.issues)


def test_a_clean_set_has_no_issues():
    report = run_lint([chat(f"q{i}", f"a{i}", f"t:{i}") for i in range(5)], [chat("q9", "a9", "v:1")])
    assert report.issues == [] and report.summary() == "0 errors, 0 warnings in 5 train, 1 validation rows"


def test_each_problem_is_found_on_its_row():
    train = [
        chat("q", "   ", "t:1"),  # empty response
        chat("hello world " * 40, "42", "t:2"),  # prompt fills max_length
        chat("hi", "hello world " * 40, "t:3"),  # truncated, EOS cut
        chat("Same  Question", "same answer", "t:4"),
        chat("same question", "Same Answer", "t:5"),  # duplicate of t:4 (case/space)
        Record(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
            "t:6",
        ),
        Record(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
            "t:7",
        ),
        Record([{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}], "t:8"),
    ]
    val = [chat("q-val", "a-val", "v:1"), chat("same question", "same answer", "v:2")]  # v:2 leaks from train
    report = run_lint(train, val)
    assert codes(report) == sorted(
        [
            ("empty_response", "t:1"),
            ("prompt_too_long", "t:2"),
            ("truncated", "t:3"),
            ("no_eos", "t:3"),
            ("duplicate", "t:5"),
            ("roles", "t:6"),
            ("ends_with_user", "t:7"),
            ("empty_field", "t:8"),
            ("leakage", "v:2"),
        ]
    )
    assert {i.code for i in report.errors} == {"empty_response", "prompt_too_long", "roles", "leakage"}
    text = report.format()
    assert re.search(r"t:2: \d{3} tokens, max_length 64", text) and re.search(
        r"t:3: \d{3} tokens, \d+ over max_length 64", text
    )
    assert "v:2: validation row equals train row t:4" in text


def test_all_masked_row_is_an_error():
    tok = make_tokenizer("qwen2")
    rec = chat("q", "a", "t:1")
    ex = Renderer(tok).encode(rec)
    ex.labels = [-100] * len(ex.labels)
    report = lint({"train": [rec]}, {"train": [ex]}, 64, stop_token_ids(tok))
    assert codes(report) == [("nothing_trained", "t:1")]


def test_sharegpt_roles_not_alternating_and_preference_checks():
    share = to_records(
        [
            Row(
                {
                    "conversations": [
                        {"from": "human", "value": "a"},
                        {"from": "gpt", "value": "b"},
                        {"from": "gpt", "value": "c"},
                    ]
                },
                "s:1",
            )
        ]
    )
    pref = to_records(
        [
            Row({"prompt": "p", "chosen": "same", "rejected": "same"}, "p:1"),
            Row({"prompt": "p", "chosen": " ", "rejected": "x"}, "p:2"),
        ]
    )
    report = lint({"train": share + pref})
    assert codes(report) == [("empty_response", "p:2"), ("roles", "s:1"), ("same_pair", "p:1")]


def test_real_hh_pairs_flag_the_empty_and_non_alternating_rows():
    report = lint({"train": load_records(str(FIX / "hh_harmless_pairs.jsonl"))})
    found = {(i.code, i.where.rsplit(":", 1)[1]) for i in report.errors}
    assert found == {
        ("empty_response", "61"),
        ("roles", "63"),
    }  # source rows 87 and 764 (see fixtures/shared/README.md)


def test_train_refuses_on_lint_errors_and_names_the_override(tiny_model_dir, tmp_path):
    from ayar.training.sft import train_sft

    rows = MATH_ROWS + [{"instruction": "What is 1 plus 1?", "output": ""}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = tiny_train_config(tiny_model_dir, data, tmp_path / "runs", max_steps=1)
    with pytest.raises(DataError, match=r"(?s)empty_response.*d.jsonl:13.*train anyway with data.lint=warn"):
        train_sft(cfg)
    assert not list((tmp_path / "runs").glob("*/adapter"))
    cfg.data.lint = "warn"
    run = train_sft(cfg)
    assert run.read_meta()["data"]["train_rows"] + run.read_meta()["data"]["val_rows"] == len(rows)
