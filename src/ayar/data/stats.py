"""What a dataset looks like: sizes, token lengths against max_length, EOS, empty fields, languages, diversity."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from ayar.data.records import Record
from ayar.data.render import IGNORE, Example

# Openers that are not verbs (questions, articles, pronouns), skipped when counting leading verbs.
_NOT_VERBS = set(
    """what how why who whom whose which when where is are was were do does did can could would should will
shall may might the a an this that these those there here i you he she it we they my your his her its our their if in on
at for of to and or but as with by from please imagine suppose given let""".split()
)
_STOPWORDS = _NOT_VERBS | set(
    """be been being have has had not no so than then them him me us all any some each every
more most other into about over after before up down out off also just only very can't don't it's i'm one two three
much many how""".split()
)


def describe(
    records: list[Record],
    examples: list[Example] | None = None,
    max_length: int | None = None,
    stop_ids=(),
    lang_sample: int = 500,
) -> dict:
    out = {"rows": len(records), "kinds": dict(Counter(r.kind for r in records)), "empty_fields": empty_fields(records)}
    if examples is not None:
        out["tokens"] = token_stats(examples, max_length, stop_ids)
    out["languages"] = languages(records, lang_sample)
    out["diversity"] = diversity(records)
    return out


def token_stats(examples: list[Example], max_length: int | None, stop_ids=()) -> dict:
    lengths = sorted(e.full_length for e in examples)
    over = [n - max_length for n in lengths if max_length and n > max_length]
    stops = set(stop_ids)
    ends = [next((t for t in reversed(e.labels) if t != IGNORE), None) for e in examples]
    pct = lambda p: lengths[min(len(lengths) - 1, int(p / 100 * len(lengths)))] if lengths else 0
    return {
        "total": sum(lengths),
        "trained": sum(e.n_trained for e in examples),
        "min": lengths[0] if lengths else 0,
        "p50": pct(50),
        "p90": pct(90),
        "p99": pct(99),
        "max": lengths[-1] if lengths else 0,
        "mean": round(sum(lengths) / max(len(lengths), 1), 1),
        "max_length": max_length,
        "over_max_length": len(over),
        "over_by_mean": round(sum(over) / len(over), 1) if over else 0,
        "over_by_max": max(over, default=0),
        "eos_share": round(sum(1 for t in ends if t in stops) / max(len(ends), 1), 4) if stops else None,
        "lengths": lengths,
    }


def empty_fields(records: list[Record]) -> dict:
    c = Counter()
    for r in records:
        for m in r.messages + (r.chosen or []) + (r.rejected or []):
            if not m["content"].strip():
                c[m["role"]] += 1
        if r.text is not None and not r.text.strip():
            c["text"] += 1
    return dict(c)


def languages(records: list[Record], sample: int = 500) -> dict:
    """Share of rows per language (py3langid on up to `sample` evenly spaced rows)."""
    import py3langid

    if not records:
        return {}
    step = max(1, len(records) // sample)
    picked = records[::step][:sample]
    counts = Counter(py3langid.classify(" ".join(r.strings())[:1000])[0] for r in picked)
    return {lang: round(n / len(picked), 3) for lang, n in counts.most_common(8)}


def _prompt(r: Record) -> str:
    if r.kind in ("text", "classification"):
        return r.text
    return next((m["content"] for m in r.messages if m["role"] == "user"), "")


def _answers(r: Record) -> list[str]:
    if r.kind in ("text", "classification"):
        return [r.text]
    return [m["content"] for m in r.conversation() if m["role"] == "assistant"]


def diversity(records: list[Record]) -> dict:
    answers = [a for r in records for a in _answers(r)]
    words = [w for a in answers for w in re.findall(r"\w+", a.lower())]
    bigrams = list(zip(words, words[1:]))
    leading = Counter()
    for r in records:
        first = next((w for w in re.findall(r"[a-zA-Z']+", _prompt(r).lower())[:3] if w not in _NOT_VERBS), None)
        if first:
            leading[first] += 1
    doc_words = Counter()
    for r in records:
        doc_words.update({w for w in re.findall(r"[a-z]{3,}", _prompt(r).lower()) if w not in _STOPWORDS})
    top = doc_words.most_common(50)
    total = sum(n for _, n in top)
    entropy = -sum(n / total * math.log(n / total) for _, n in top) / math.log(len(top)) if len(top) > 1 else 0.0
    return {
        "distinct_1": round(len(set(words)) / max(len(words), 1), 4),
        "distinct_2": round(len(set(bigrams)) / max(len(bigrams), 1), 4),
        "leading_verbs": leading.most_common(10),
        "top_topic_words": top[:15],
        "topic_spread": round(entropy, 3),  # normalized entropy of the 50 commonest prompt words: 1 = evenly spread
    }


def histogram_png(lengths: list[int], max_length: int | None, path: str | Path, title: str = "token lengths") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=50, color="#4472c4")
    if max_length:
        ax.axvline(max_length, color="#c00000", linestyle="--", label=f"max_length {max_length}")
        ax.legend()
    ax.set_xlabel("tokens per row (rendered with the chat template)")
    ax.set_ylabel("rows")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
