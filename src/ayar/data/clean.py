"""Cleaning: exact and near-duplicate removal, PII scrubbing, length filters, leakage removal.

Works on Records and returns new ones plus a report of every removal and change with its rule; the
input is never modified (the CLI refuses to write over its input file).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field

from ayar.data.lint import normalized_hash
from ayar.data.records import Record
from ayar.errors import DataError


@dataclass
class CleanOptions:
    dedup: bool = True  # exact duplicates (case/whitespace-insensitive)
    near_dup: bool = True  # MinHash LSH near-duplicates
    near_threshold: float = 0.85  # estimated Jaccard similarity of word 3-gram shingles
    pii: bool = True
    pii_names: bool = False  # names/addresses via presidio (the `pii` extra)
    min_chars: int = 0  # drop rows whose text is shorter (0: no limit)
    max_chars: int = 0  # drop rows whose text is longer (0: no limit)
    drop_empty: bool = True  # drop rows with an empty answer/text
    against: list[Record] = field(default_factory=list)  # drop rows that also occur here (e.g. the validation set)


@dataclass
class CleanReport:
    input_rows: int = 0
    output_rows: int = 0
    removed: Counter = field(default_factory=Counter)  # rule -> rows removed
    replaced: Counter = field(default_factory=Counter)  # PII type -> occurrences replaced
    changed_rows: int = 0
    examples: list[dict] = field(default_factory=list)  # a few {where, rule, detail} per rule

    def note(self, rule: str, where: str, detail: str = "") -> None:
        if sum(1 for e in self.examples if e["rule"] == rule) < 5:
            self.examples.append({"rule": rule, "where": where, "detail": detail})

    def to_dict(self) -> dict:
        return {
            "input_rows": self.input_rows,
            "output_rows": self.output_rows,
            "removed": dict(self.removed),
            "pii_replaced": dict(self.replaced),
            "rows_changed_by_pii_scrub": self.changed_rows,
            "examples": self.examples,
        }

    def format(self) -> str:
        lines = [f"{self.input_rows} rows in, {self.output_rows} rows out"]
        lines += [f"  removed {n:>6}  {rule}" for rule, n in self.removed.most_common()]
        lines += [f"  replaced {n:>5}  {kind}" for kind, n in self.replaced.most_common()]
        if self.changed_rows:
            lines.append(f"  {self.changed_rows} rows changed by the PII scrub")
        for e in self.examples:
            lines.append(f"    {e['rule']}: {e['where']}" + (f" ({e['detail']})" if e["detail"] else ""))
        return "\n".join(lines)


def clean(records: list[Record], opts: CleanOptions = CleanOptions()) -> tuple[list[Record], CleanReport]:
    report = CleanReport(input_rows=len(records))
    out = list(records)
    if opts.drop_empty:
        out = _drop(out, report, "empty", lambda r: "the answer or text is empty" if _empty(r) else None)
    if opts.min_chars or opts.max_chars:

        def bad_length(r: Record):
            n = sum(len(s) for s in r.strings())
            if opts.min_chars and n < opts.min_chars:
                return f"{n} chars < {opts.min_chars}"
            if opts.max_chars and n > opts.max_chars:
                return f"{n} chars > {opts.max_chars}"
            return None

        out = _drop(out, report, "length", bad_length)
    if opts.against:
        other = {normalized_hash(r): r.where for r in opts.against}
        out = _drop(
            out,
            report,
            "in_other_split",
            lambda r: f"equals {other[h]}" if (h := normalized_hash(r)) in other else None,
        )
    if opts.dedup:
        first: dict[str, str] = {}

        def exact(r: Record):
            h = normalized_hash(r)
            if h in first:
                return f"same as {first[h]}"
            first[h] = r.where
            return None

        out = _drop(out, report, "exact_duplicate", exact)
    if opts.near_dup:
        out = _near_dedup(out, report, opts.near_threshold)
    if opts.pii:
        scrub = PiiScrubber(names=opts.pii_names)
        scrubbed = []
        for r in out:
            counts = Counter()
            new = r.map_strings(lambda s: scrub(s, counts))
            if counts:
                report.changed_rows += 1
                report.replaced.update(counts)
                report.note("pii", r.where, ", ".join(f"{k} x{v}" for k, v in counts.items()))
            scrubbed.append(new)
        out = scrubbed
    report.output_rows = len(out)
    return out, report


def _drop(records: list[Record], report: CleanReport, rule: str, why) -> list[Record]:
    kept = []
    for r in records:
        reason = why(r)
        if reason is None:
            kept.append(r)
        else:
            report.removed[rule] += 1
            report.note(rule, r.where, reason)
    return kept


def _empty(r: Record) -> bool:
    if r.kind in ("text", "classification"):
        return not r.text.strip()
    if r.kind == "preference":
        return any(all(not m["content"].strip() for m in ms) for ms in (r.chosen, r.rejected))
    return any(not m["content"].strip() for m in r.messages if m["role"] == "assistant")


# --- near duplicates ------------------------------------------------------------------------------


def shingles(text: str, n: int = 3) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _near_dedup(records: list[Record], report: CleanReport, threshold: float, num_perm: int = 256) -> list[Record]:
    """Keep the first of each group of rows whose estimated Jaccard similarity is >= threshold. LSH finds
    candidates at a lower threshold (for recall); each candidate is then checked against the threshold."""
    from datasketch import MinHash, MinHashLSH

    if not 0 < threshold <= 1:
        raise DataError(f"the near-duplicate threshold must be in (0, 1], got {threshold}")
    lsh = MinHashLSH(threshold=max(0.3, threshold - 0.15), num_perm=num_perm)
    kept, sketches = [], {}
    for i, r in enumerate(records):
        sh = shingles("\n".join(r.strings()))
        if not sh:
            kept.append(r)
            continue
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch([s.encode() for s in sh])
        match = next((int(k) for k in sorted(lsh.query(m), key=int) if m.jaccard(sketches[k]) >= threshold), None)
        if match is not None:
            report.removed["near_duplicate"] += 1
            report.note("near_duplicate", r.where, f"similar to {records[match].where}")
            continue
        sketches[str(i)] = m
        lsh.insert(str(i), m)
        kept.append(r)
    return kept


# --- PII ----------------------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_CARD = re.compile(r"(?<![\d.,])(?:\d[ -]?){12,18}\d(?![\d.,]\d)")
# Phone shapes: international (+CC ...), North American (212) 555-7890 / 212-555-7890, and European/Turkish
# trunk-prefixed 0555 123 45 67. Arithmetic such as 960-480-1200=... is excluded by the look-arounds.
_NOT_MATH_BEFORE = r"(?<![\w+<=*/.-])"
_NOT_MATH_AFTER = r"(?![\w-]|\s*[=*/+x]\s*\$?\d|>>)"
_PHONE = re.compile(
    _NOT_MATH_BEFORE + r"(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
    r"|(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}"
    r"|0\d{3} \d{3} \d{2} \d{2}"
    r")" + _NOT_MATH_AFTER
)
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d]|\.\d)"
)
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


class PiiScrubber:
    """Replace PII with typed placeholders: [EMAIL], [IBAN], [CREDIT_CARD], [PHONE], [IP_ADDRESS]
    (and [PERSON], [LOCATION] through presidio when `names`). Card numbers must pass the Luhn check and
    IBANs the mod-97 check, so ordinary numbers (prices, counts, arithmetic) are left alone."""

    def __init__(self, names: bool = False):
        self.analyzer = _presidio() if names else None

    def __call__(self, text: str, counts: Counter | None = None) -> str:
        counts = counts if counts is not None else Counter()

        def sub(pattern, label, valid=lambda m: True):
            def repl(m):
                if not valid(m.group(0)):
                    return m.group(0)
                counts[label] += 1
                return f"[{label}]"

            return pattern.sub(repl, text)

        text = sub(_EMAIL, "EMAIL")
        text = sub(_IBAN, "IBAN", iban_ok)
        text = sub(
            _CARD, "CREDIT_CARD", lambda s: (d := re.sub(r"\D", "", s))[0] in "3456" and luhn_ok(d) and len(set(d)) > 1
        )
        text = sub(_IPV4, "IP_ADDRESS")
        text = sub(_IPV6, "IP_ADDRESS", _ipv6_ok)
        text = sub(_PHONE, "PHONE", lambda s: 9 <= len(re.sub(r"\D", "", s)) <= 15)
        if self.analyzer is not None:
            text = self._names(text, counts)
        return text

    def _names(self, text: str, counts: Counter) -> str:
        results = self.analyzer.analyze(text=text, entities=["PERSON", "LOCATION"], language="en")
        for res in sorted(results, key=lambda r: r.start, reverse=True):
            counts[res.entity_type] += 1
            text = text[: res.start] + f"[{res.entity_type}]" + text[res.end :]
        return text


def _ipv6_ok(s: str) -> bool:
    if s.count(":") < 2 or not any(c.isdigit() for c in s):
        return False
    try:
        ipaddress.IPv6Address(s)
        return True
    except ValueError:
        return False


def _presidio():
    try:
        from presidio_analyzer import AnalyzerEngine
    except ImportError:
        raise DataError(
            "name/address scrubbing needs presidio: pip install -e '.[pii]' (and a spaCy English model)"
        ) from None
    try:
        return AnalyzerEngine()
    except Exception as e:  # missing spaCy model, most often
        raise DataError(
            f"presidio could not start ({e}); install a spaCy model: python -m spacy download en_core_web_lg"
        ) from None
