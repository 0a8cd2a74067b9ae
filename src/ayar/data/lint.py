"""Data lint: the problems that silently ruin a fine-tune, found before a single step runs.

Errors stop `ayar train` (unless `data.lint=warn`); warnings are reported. Every issue names its row.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from ayar.data.records import Record
from ayar.data.render import IGNORE, Example

# code -> (level, what it means, how to fix it)
RULES = {
    "empty_response": (
        "error",
        "the answer to train on is empty",
        "fill in or drop the row (ayar data clean drops them)",
    ),
    "empty_text": ("error", "the text is empty", "drop the row"),
    "nothing_trained": (
        "error",
        "no token of the row is trained (all labels masked)",
        "check the row's roles and template",
    ),
    "prompt_too_long": (
        "error",
        "the prompt fills data.max_length, so no answer token is left to train",
        "raise data.max_length or shorten the prompt",
    ),
    "roles": (
        "error",
        "turns do not alternate user/assistant (the chat template may reject or misrender it)",
        "merge or drop the out-of-order turns",
    ),
    "same_pair": ("error", "chosen and rejected are the same, so there is no preference to learn", "drop the pair"),
    "leakage": (
        "error",
        "the row also appears in another split, so its evaluation is not held out",
        "remove it from one split (`ayar data clean TRAIN --against VAL` drops them from TRAIN)",
    ),
    "truncated": (
        "warning",
        "the row is longer than data.max_length and is cut",
        "raise data.max_length or filter long rows",
    ),
    "no_eos": (
        "warning",
        "truncation cut the end-of-turn token, so this row does not teach the model to stop",
        "raise data.max_length",
    ),
    "duplicate": (
        "warning",
        "the row duplicates an earlier row of the same split",
        "ayar data clean removes duplicates",
    ),
    "empty_field": ("warning", "a prompt or system turn is empty", "fill it in or drop the turn"),
    "ends_with_user": (
        "warning",
        "the conversation ends with a user turn, which is never trained",
        "drop the last turn",
    ),
}


@dataclass
class Issue:
    code: str
    where: str
    detail: str = ""

    @property
    def level(self) -> str:
        return RULES[self.code][0]


@dataclass
class LintReport:
    issues: list[Issue] = field(default_factory=list)
    rows: dict = field(default_factory=dict)  # split -> rows checked

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "warning"]

    def counts(self) -> dict:
        return dict(Counter(i.code for i in self.issues))

    def summary(self) -> str:
        checked = ", ".join(f"{n} {split}" for split, n in self.rows.items() if n)
        return f"{len(self.errors)} errors, {len(self.warnings)} warnings in {checked} rows"

    def format(self, per_code: int = 5) -> str:
        lines = []
        by_code: dict[str, list[Issue]] = {}
        for issue in self.issues:
            by_code.setdefault(issue.code, []).append(issue)
        for code, items in sorted(by_code.items(), key=lambda kv: (RULES[kv[0]][0] != "error", kv[0])):
            level, what, fix = RULES[code]
            lines.append(f"{level} [{code}] x{len(items)}: {what}; fix: {fix}")
            for i in items[:per_code]:
                lines.append(f"    {i.where}" + (f": {i.detail}" if i.detail else ""))
            if len(items) > per_code:
                lines.append(f"    ... and {len(items) - per_code} more")
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "counts": self.counts(),
            "issues": [{"level": i.level, "code": i.code, "where": i.where, "detail": i.detail} for i in self.issues],
        }


def lint(
    splits: dict[str, list[Record]],
    examples: dict[str, list[Example]] | None = None,
    max_length: int | None = None,
    stop_ids: list[int] = (),
) -> LintReport:
    """Check records (and, when given, their encoded examples) of every split; duplicates across splits are leakage."""
    report = LintReport(rows={name: len(recs) for name, recs in splits.items()})
    seen: dict[str, tuple[str, str]] = {}  # normalized hash -> (split, where) of its first occurrence
    for split, records in splits.items():
        exs = (examples or {}).get(split)
        for i, rec in enumerate(records):
            report.issues += _record_issues(rec)
            if exs is not None:
                report.issues += _example_issues(exs[i], max_length, set(stop_ids))
            key = normalized_hash(rec)
            if key in seen:
                first_split, first_where = seen[key]
                if first_split == split:
                    report.issues.append(Issue("duplicate", rec.where, f"same as {first_where}"))
                else:
                    report.issues.append(
                        Issue("leakage", rec.where, f"{split} row equals {first_split} row {first_where}")
                    )
            else:
                seen[key] = (split, rec.where)
    return report


def normalized_hash(rec: Record) -> str:
    """Equal for rows that differ only in case, whitespace or location."""
    norm = rec.map_strings(lambda s: " ".join(s.lower().split()))
    return hashlib.sha1(json.dumps(norm.payload(), sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _record_issues(rec: Record) -> list[Issue]:
    out = []
    if rec.kind in ("text", "classification"):
        if not rec.text.strip():
            out.append(Issue("empty_text", rec.where))
        return out
    turns = rec.messages
    roles = [m["role"] for m in turns if m["role"] != "system"]
    if any(m["role"] == "system" for m in turns[1:]):
        out.append(Issue("roles", rec.where, "a system turn after the first turn"))
    expected = ["user", "assistant"] * len(roles)
    if roles != expected[: len(roles)]:
        out.append(Issue("roles", rec.where, "roles " + " > ".join(roles)))
    if any(not m["content"].strip() for m in turns if m["role"] in ("user", "system")):
        out.append(Issue("empty_field", rec.where))
    if rec.kind == "preference":
        if rec.chosen == rec.rejected:
            out.append(Issue("same_pair", rec.where))
        for name, ms in (("chosen", rec.chosen), ("rejected", rec.rejected)):
            if all(not m["content"].strip() for m in ms):
                out.append(Issue("empty_response", rec.where, f"{name} is empty"))
        return out
    answers = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
    for i in answers:
        if not turns[i]["content"].strip():
            out.append(Issue("empty_response", rec.where, f"turn {i}"))
    if turns and turns[-1]["role"] == "user":
        out.append(Issue("ends_with_user", rec.where))
    return out


def _example_issues(ex: Example, max_length: int | None, stop_ids: set) -> list[Issue]:
    trained = [t for t in ex.labels if t != IGNORE]
    if not trained:
        if ex.truncated:
            return [Issue("prompt_too_long", ex.where, f"{ex.full_length} tokens, max_length {max_length}")]
        return [Issue("nothing_trained", ex.where)]
    out = []
    if ex.truncated:
        out.append(
            Issue(
                "truncated",
                ex.where,
                f"{ex.full_length} tokens, {ex.full_length - len(ex.input_ids)} over max_length {max_length}",
            )
        )
        if stop_ids and trained[-1] not in stop_ids:
            out.append(Issue("no_eos", ex.where))
    return out
