"""Tokenization cache, statistics, preview, and the `ayar data` commands end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ayar.data.cache import encode_cached
from ayar.data.dataset import load_records
from ayar.data.preview import boundaries, html_page
from ayar.data.records import Record
from ayar.data.render import IGNORE, Example, Renderer
from ayar.data.stats import diversity, empty_fields, languages, token_stats
from tests.helpers import MATH_ROWS, make_tokenizer, tiny_train_config, write_jsonl

FIX = Path(__file__).parents[2] / "fixtures" / "shared"
GSM8K = str(FIX / "gsm8k_train.jsonl")


def chat(user, answer, where="x:1"):
    return Record([{"role": "user", "content": user}, {"role": "assistant", "content": answer}], where)


# --- cache --------------------------------------------------------------------------------------


def test_cache_hits_on_unchanged_input_and_misses_on_any_change(tmp_path):
    tok = make_tokenizer("qwen2")
    recs = load_records(GSM8K, columns={"instruction": "question", "output": "answer"})[:40]
    r = Renderer(tok, max_length=128)
    first, hit1 = encode_cached(recs, r, root=tmp_path)
    second, hit2 = encode_cached(recs, r, root=tmp_path)
    assert (hit1, hit2) == (False, True)
    assert [(e.input_ids, e.labels, e.truncated, e.full_length, e.where) for e in first] == [
        (e.input_ids, e.labels, e.truncated, e.full_length, e.where) for e in second
    ]
    changed = [recs[0].map_strings(lambda s: s + "!")] + recs[1:]
    for variant in (
        [changed, r],
        [recs, Renderer(tok, max_length=64)],
        [recs, Renderer(tok, max_length=128, system_prompt="Be brief.")],
        [recs, Renderer(tok, max_length=128, train_on_prompt=True)],
        [recs, Renderer(make_tokenizer("llama"), max_length=128)],
    ):
        assert encode_cached(*variant, root=tmp_path)[1] is False
    entry = next(p for p in tmp_path.iterdir() if p.suffix == ".npz")
    entry.write_bytes(b"damaged")
    for p in tmp_path.iterdir():
        p.write_bytes(b"damaged")
    again, hit = encode_cached(recs, r, root=tmp_path)
    assert hit is False and [e.input_ids for e in again] == [e.input_ids for e in first]


def test_second_training_run_skips_tokenization(tiny_model_dir, tmp_path, monkeypatch):
    from ayar.training.sft import train_sft

    monkeypatch.setenv("AYAR_HOME", str(tmp_path / "home"))  # an empty cache: other tests tokenize the same rows

    data = write_jsonl(tmp_path / "d.jsonl", MATH_ROWS)
    cfg = tiny_train_config(tiny_model_dir, data, tmp_path / "runs", max_steps=1)
    first = train_sft(cfg).read_meta()["data"]
    second = train_sft(cfg).read_meta()["data"]
    assert (first["tokenization_cached"], second["tokenization_cached"]) == (False, True)
    assert {k: v for k, v in first.items() if k != "tokenization_cached"} == {
        k: v for k, v in second.items() if k != "tokenization_cached"
    }


# --- statistics ---------------------------------------------------------------------------------


def test_distinct_n_leading_verbs_and_topic_words_by_hand():
    recs = [
        chat("Write a poem about the sea", "the sea the sea"),
        chat("What is the sea? Explain", "a b"),
        chat("write a story", "the end"),
    ]
    d = diversity(recs)
    # answer words: the sea the sea a b the end -> 8 words, 5 distinct; bigrams: 7, distinct 6 (the-sea twice)
    assert (d["distinct_1"], d["distinct_2"]) == (round(5 / 8, 4), round(6 / 7, 4))
    assert d["leading_verbs"] == [("write", 2)]  # "What is the ..." opens with no verb in its first three words
    assert set(d["top_topic_words"][:2]) == {("write", 2), ("sea", 2)}


def test_alpaca_seed_leading_verbs_and_language_mix():
    d = diversity(load_records(str(FIX / "alpaca_seed_tasks.jsonl")))
    assert {w for w, _ in d["leading_verbs"][:5]} & {"generate", "write", "give", "find", "make", "create"}
    mix = [
        chat("Bugün hava çok güzel, parka gidelim mi?", "Evet, hemen gidelim ve biraz yürüyelim."),
        chat("The weather is lovely today, shall we go to the park?", "Yes, let us go and walk for a while."),
    ]
    assert languages(mix) == {"tr": 0.5, "en": 0.5}


def test_token_stats_by_hand():
    exs = [
        Example([1] * n, [IGNORE] * (n - 1) + [9], f"r:{n}", n > 10, n + (5 if n > 10 else 0))
        for n in (4, 6, 8, 10, 10)
    ]
    exs[0].labels[-1] = 3  # one row does not end with the stop token
    st = token_stats(exs, 10, stop_ids=[9])
    assert (st["min"], st["max"], st["p50"], st["mean"]) == (4, 10, 8, 7.6)
    assert st["eos_share"] == 0.8 and st["over_max_length"] == 0
    over = token_stats([Example([1] * 10, [9] * 10, "r", True, 17)], 10, [9])
    assert (over["over_max_length"], over["over_by_max"]) == (1, 7)
    assert empty_fields([chat("", "a"), chat("q", " "), Record([], "t", text="")]) == {
        "user": 1,
        "assistant": 1,
        "text": 1,
    }


# --- preview ------------------------------------------------------------------------------------


def test_preview_marks_exactly_the_trained_tokens():
    tok = make_tokenizer("qwen2")
    ex = Renderer(tok).encode(chat("What is 12 plus 30?", "42"))
    b = boundaries(ex)
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE)
    assert b[0]["kind"] == "answer starts" and b[0]["position"] == first
    assert b[0]["after"][0] == ex.input_ids[first]
    page = html_page(tok, [ex])
    assert page.count('class="t"') == ex.n_trained and page.count('class="p"') == len(ex.input_ids) - ex.n_trained


# --- the commands -------------------------------------------------------------------------------


def ayar(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "ayar", "data", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_cli_lint_exit_codes(tiny_model_dir, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", MATH_ROWS)
    r = ayar("lint", str(good), "--model", str(tiny_model_dir))
    assert r.returncode == 0 and "clean: 0 errors, 0 warnings in 12 train rows" in r.stdout, r.stderr
    val = write_jsonl(tmp_path / "val.jsonl", MATH_ROWS[:2])
    r = ayar("lint", str(good), "--val", str(val), "--model", str(tiny_model_dir), "--json")
    report = json.loads(r.stdout)
    assert (
        r.returncode == 1
        and report["counts"] == {"leakage": 2}
        and report["issues"][0]["where"].endswith("val.jsonl:1")
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": \n')
    r = ayar("lint", str(bad), "--model", str(tiny_model_dir))
    assert r.returncode == 2 and "bad.jsonl:2: invalid JSON" in r.stderr and "Traceback" not in r.stderr


def test_cli_inspect_preview_stats(tiny_model_dir, tmp_path):
    r = ayar(
        "inspect",
        GSM8K,
        "--columns",
        "instruction=question,output=answer",
        "--model",
        str(tiny_model_dir),
        "--max-length",
        "256",
        "--json",
        "--png",
        str(tmp_path / "len.png"),
    )
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["train"]
    assert st["rows"] == 300 and st["tokens"]["max_length"] == 256 and st["languages"] == {"en": 1.0}
    assert st["tokens"]["over_max_length"] > 0 and (tmp_path / "len.png").stat().st_size > 1000
    r = ayar(
        "preview",
        GSM8K,
        "--columns",
        "instruction=question,output=answer",
        "--model",
        str(tiny_model_dir),
        "-n",
        "2",
        "--html",
        str(tmp_path / "p.html"),
    )
    assert r.returncode == 0 and r.stdout.count("answer starts at token") == 2
    assert (tmp_path / "p.html").read_text().count("<section>") == 2
    r = ayar("stats", str(FIX / "alpaca_seed_tasks.jsonl"))
    assert r.returncode == 0 and "leading verbs" in r.stdout and "distinct-1" in r.stdout


def test_cli_clean_and_convert(tmp_path):
    src = FIX / "hh_harmless_pairs.jsonl"
    before = src.read_bytes()
    r = ayar("clean", str(src), "--out", str(tmp_path / "clean.jsonl"), "--to", "preference")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "clean.jsonl.report.json").read_text())
    assert report["removed"] == {"empty": 1} and report["output_rows"] == 62
    assert len((tmp_path / "clean.jsonl").read_text().splitlines()) == 62 and src.read_bytes() == before
    r = ayar("clean", str(src), "--out", str(src))
    assert r.returncode == 2 and "never modified" in r.stderr and src.read_bytes() == before
    r = ayar(
        "convert",
        GSM8K,
        "--columns",
        "instruction=question,output=answer",
        "--to",
        "messages",
        "--out",
        str(tmp_path / "m.jsonl"),
    )
    assert (
        r.returncode == 0
        and json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])["messages"][0]["role"] == "user"
    )
    r = ayar(
        "convert",
        GSM8K,
        "--columns",
        "instruction=question,output=answer",
        "--to",
        "hh",
        "--out",
        str(tmp_path / "x.jsonl"),
    )
    assert r.returncode == 2 and "cannot be written as 'hh'" in r.stderr


def _snapshot(folder):
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("action", ["clean", "convert"])
def test_inputs_are_never_written_by_any_route(tmp_path, action, capsys):
    """`ayar data clean DIR/ --out DIR/t.jsonl` overwrote its own input: the guard compared literal paths only.
    Folders, globs, --config sources and --against files are inputs too; so is a new file inside an input
    folder or matching an input glob (the next read would take it in)."""
    from ayar.cli import main

    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "t.jsonl", MATH_ROWS)
    write_jsonl(data / "u.jsonl", MATH_ROWS[:3])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  train: {data / '*.jsonl'}\n")
    before = _snapshot(data)
    extra = ["--to", "messages"] if action == "convert" else []
    routes = [
        [str(data), "--out", str(data / "t.jsonl")],  # a folder's file
        [str(data) + "/", "--out", str(data / "new.jsonl")],  # a new file inside the input folder
        [str(data / "*.jsonl"), "--out", str(data / "u.jsonl")],  # a glob's match
        ["--config", str(cfg), "--out", str(data / "t.jsonl")],  # a config's source
        [str(data / "t.jsonl"), "--out", str(data / "t.jsonl"), "--force"],  # --force never reaches an input
    ]
    for route in routes:
        assert main(["data", action, *route, *extra]) == 2, route
        assert _snapshot(data) == before, route
        assert "input" in capsys.readouterr().err


def test_an_existing_output_needs_force(tmp_path):
    from ayar.cli import main

    src = write_jsonl(tmp_path / "in.jsonl", MATH_ROWS)
    out = tmp_path / "out.jsonl"
    out.write_text("something of the user's\n")
    assert main(["data", "convert", str(src), "--to", "messages", "--out", str(out)]) == 2
    assert out.read_text() == "something of the user's\n"
    assert main(["data", "convert", str(src), "--to", "messages", "--out", str(out), "--force"]) == 0
    assert len(out.read_text().splitlines()) == len(MATH_ROWS)


def test_a_truncated_cache_entry_is_rebuilt(tmp_path):
    """A cache entry cut short (the process was killed while writing it, the disk filled) raised EOFError or
    BadZipFile on every later run instead of being rebuilt."""
    tok = make_tokenizer("qwen2")
    recs = load_records(GSM8K, columns={"instruction": "question", "output": "answer"})[:20]
    r = Renderer(tok, max_length=128)
    first, _ = encode_cached(recs, r, root=tmp_path)
    entry = next(p for p in tmp_path.iterdir() if p.suffix == ".npz")
    whole = entry.read_bytes()
    for cut in (whole[: len(whole) // 2], whole[:30], b""):
        entry.write_bytes(cut)
        again, hit = encode_cached(recs, r, root=tmp_path)
        assert hit is False and [e.input_ids for e in again] == [e.input_ids for e in first]
