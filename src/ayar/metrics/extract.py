"""Answer extraction: pull the comparable answer out of a free-form generation.

    gsm8k        the number after the last "####" (GSM8K's answer line); falls back to the last number
    last_number  the last number in the text
    regex:PAT    the first capture group (or the whole match) of PAT, last match wins
    none         the whole text, stripped
    auto         gsm8k when the references carry "####", else none
Numbers are compared as numbers: "1,000", "$1000.00" and "1000" are equal.
"""

from __future__ import annotations

import re

from ayar.errors import AyarError

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_GSM8K = re.compile(r"####\s*(-?\$?\s*\d[\d,]*(?:\.\d+)?)")


def normalize_number(text: str) -> str | None:
    s = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(round(value, 6))


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def gsm8k_answer(text: str) -> str | None:
    found = _GSM8K.findall(text)
    return normalize_number(found[-1]) if found else last_number(text)


def make_extractor(spec: str, references: list[str] = ()):
    """A function text -> comparable answer (None when nothing can be extracted)."""
    if spec == "auto":
        spec = "gsm8k" if references and sum("####" in r for r in references) > len(references) / 2 else "none"
    if spec == "gsm8k":
        return gsm8k_answer
    if spec == "last_number":
        return last_number
    if spec == "none":
        return lambda text: " ".join(text.split()).lower() or None
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec.removeprefix("regex:"), re.S)
        except re.error as e:
            raise AyarError(f"answer extraction {spec!r}: not a valid regular expression ({e})") from None

        def by_regex(text: str) -> str | None:
            matches = list(pattern.finditer(text))
            if not matches:
                return None
            m = matches[-1]
            value = (m.group(1) if pattern.groups else m.group(0)).strip()
            return normalize_number(value) or value.lower()

        return by_regex
    raise AyarError(f"unknown answer extraction {spec!r}; use auto, gsm8k, last_number, none or regex:PATTERN")
