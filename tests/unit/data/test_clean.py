"""Cleaning: exact and MinHash near-duplicates, PII with typed placeholders (no false positives on GSM8K
numbers), length filters, leakage removal, and a report with counts per rule."""

import os
import random
from collections import Counter
from pathlib import Path

import pytest

from ayar.data.clean import CleanOptions, PiiScrubber, clean, iban_ok, luhn_ok, shingles
from ayar.data.dataset import load_records
from ayar.data.records import Record
from ayar.errors import DataError

FIX = Path(__file__).parents[2] / "fixtures" / "shared"
GSM8K_COLUMNS = {"instruction": "question", "output": "answer"}
SHARED = Path(os.environ.get("AYAR_SHARED_DATA", Path(__file__).parents[4] / "shared" / "data"))


def gsm8k():
    return load_records(str(FIX / "gsm8k_train.jsonl"), columns=GSM8K_COLUMNS)


def edit_words(text: str, n: int, rng: random.Random) -> str:
    """A near-duplicate: n words replaced."""
    words = text.split()
    for i in rng.sample(range(len(words)), n):
        words[i] = "blah"
    return " ".join(words)


def test_planted_exact_and_near_duplicates_are_found():
    recs = gsm8k()
    rng = random.Random(0)
    planted_exact = [
        Record([{**m, "content": m["content"].upper() + "  "} for m in recs[i].messages], f"exact:{i}") for i in (3, 50)
    ]
    planted_near = [
        Record([{**m, "content": edit_words(m["content"], 1, rng)} for m in recs[i].messages], f"near:{i}")
        for i in (10, 120, 200, 299)
    ]
    out, report = clean(recs + planted_exact + planted_near, CleanOptions(pii=False))
    assert report.removed == Counter({"exact_duplicate": 2, "near_duplicate": 4})
    assert {r.where for r in out} == {r.where for r in recs}  # originals kept, every plant removed
    near = [e for e in report.examples if e["rule"] == "near_duplicate"]
    assert near[0]["where"] == "near:10" and near[0]["detail"].endswith("gsm8k_train.jsonl:11")


def test_near_dup_threshold_and_distinct_rows_survive():
    recs = gsm8k()
    out, report = clean(recs, CleanOptions(pii=False))
    assert len(out) == len(recs) and not report.removed  # GSM8K's first 300 rows are all distinct
    a = "the quick brown fox jumps over the lazy dog near the river bank today"
    b = a.replace("today", "tonight")
    rec = lambda t, w: Record([], w, text=t)
    assert len(clean([rec(a, "a"), rec(b, "b")], CleanOptions(pii=False, dedup=False, near_threshold=0.7))[0]) == 1
    assert len(clean([rec(a, "a"), rec(b, "b")], CleanOptions(pii=False, dedup=False, near_threshold=0.95))[0]) == 2
    assert shingles("A b c d") == {"a b c", "b c d"}


PLANTED = {
    "EMAIL": ["Write to jane.doe+news@example.co.uk today.", "contact: m.yilmaz@firma.com.tr"],
    "PHONE": ["Call (212) 555-7890 now.", "Tel: +1 415-555-0132", "Ara: 0532 123 45 67", "Phone +44 20 7946 0958."],
    "CREDIT_CARD": ["Card 4111 1111 1111 1111 exp 12/29", "pay with 5500-0000-0000-0004"],
    "IBAN": ["IBAN DE89 3704 0044 0532 0130 00", "TR330006100519786457841326 is the account"],
    "IP_ADDRESS": ["server at 192.168.1.20:8080", "v6 2001:db8::8a2e:370:7334 ok"],
}


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_planted_pii_is_replaced_with_a_typed_placeholder(kind):
    scrub = PiiScrubber()
    for text in PLANTED[kind]:
        counts = Counter()
        out = scrub(text, counts)
        assert f"[{kind}]" in out and counts == Counter({kind: 1}), (text, out)


def test_pii_planted_in_gsm8k_rows_is_caught_and_nothing_else_changes():
    recs = gsm8k()
    plants = [t for texts in PLANTED.values() for t in texts]
    for i, t in enumerate(plants):
        recs[i * 20].messages[0]["content"] += " " + t
    out, report = clean(recs, CleanOptions(dedup=False, near_dup=False))
    assert report.changed_rows == len(plants)
    assert sum(report.replaced.values()) == len(plants)
    changed = [i for i, (a, b) in enumerate(zip(recs, out)) if a.payload() != b.payload()]
    assert changed == [i * 20 for i in range(len(plants))]


def test_no_false_positive_on_gsm8k_numbers():
    """Prices, counts, arithmetic chains (960-480-120=360) and long numbers are not PII."""
    scrub = PiiScrubber()
    recs = gsm8k()
    hits = Counter()
    for r in recs:
        for s in r.strings():
            scrub(s, hits)
    assert hits == Counter()
    for text in [
        "960-480-1200=5",
        "<<1000-200-400=400>>",
        "$1,234,567.89",
        "1234567890123456 apples",
        "4111 1111 1111 1112",
        "version 1.2.3",
        "at 10:30:00",
        "ratio 3:2",
        "DE89 3704 0044 0532 0130 01",
    ]:
        assert scrub(text) == text


def test_no_false_positive_on_the_full_gsm8k_train_set():
    path = SHARED / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present (set AYAR_SHARED_DATA to ../shared/data)")
    hits = Counter()
    scrub = PiiScrubber()
    for r in load_records(str(path), columns=GSM8K_COLUMNS):
        for s in r.strings():
            scrub(s, hits)
    assert hits == Counter()


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")


def test_real_hh_pii_and_empty_rows():
    recs = load_records(str(FIX / "hh_harmless_pairs.jsonl"))
    out, report = clean(recs)
    assert report.removed["empty"] == 1 and report.examples[0]["where"].endswith(":61")
    assert report.replaced == Counter({"EMAIL": 2, "PHONE": 1})  # row 353: mike@..., bob@..., +1 (555) 555-5555
    scrubbed = next(r for r in out if r.where.endswith(":62"))
    assert "[PHONE]" in " ".join(scrubbed.strings()) and "[EMAIL]" in " ".join(scrubbed.strings())
    assert "555-5555" in " ".join(recs[61].strings())  # the input records are not modified


def test_length_filters_and_against():
    recs = [Record([], f"r:{i}", text="x" * n) for i, n in enumerate((5, 50, 500))]
    out, report = clean(recs, CleanOptions(min_chars=10, max_chars=100, pii=False))
    assert [r.where for r in out] == ["r:1"] and report.removed == Counter({"length": 2})
    val = [Record([], "v:1", text="x" * 50)]
    out, report = clean(recs, CleanOptions(against=val, pii=False))
    assert [r.where for r in out] == ["r:0", "r:2"] and report.removed == Counter({"in_other_split": 1})


def test_name_scrubbing_without_presidio_is_a_clear_error():
    try:
        import presidio_analyzer  # noqa: F401

        pytest.skip("presidio is installed here")
    except ImportError:
        pass
    with pytest.raises(DataError, match=r"pip install -e '\.\[pii\]'"):
        PiiScrubber(names=True)
