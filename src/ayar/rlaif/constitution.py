"""A constitution: the written principles AI feedback is given under (Bai et al. 2022). YAML:

    principles:
      - name: harmless
        critique: Identify specific ways in which the assistant's last response is harmful ...
        revision: Rewrite the assistant's response to remove anything harmful ...
        comparison: Which of these assistant responses is less harmful ...

`critique` and `revision` drive the critique -> revision step, `comparison` the choice between two answers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ayar.errors import ConfigError

FIELDS = ("name", "critique", "revision", "comparison")


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str
    comparison: str


def load_constitution(path: str | Path | None = None) -> list[Principle]:
    """The principles of `path`, or of ayar's default constitution; a ConfigError naming the file, the principle
    and the field for anything malformed."""
    from ayar.config.loader import safe_yaml

    if path is None:
        where, text = (
            "ayar's default constitution",
            resources.files("ayar.rlaif").joinpath("constitution.yaml").read_text(),
        )
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"constitution file not found: {path}")
        where, text = str(path), path.read_text(encoding="utf-8", errors="replace")
    raw = safe_yaml(text, where)
    items = raw.get("principles") if isinstance(raw, dict) else None
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: expected `principles:` with a list of principles (name, {', '.join(FIELDS[1:])})")
    principles, names = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: principles[{i}] must be a mapping with {', '.join(FIELDS)}")
        unknown = sorted(set(map(str, item)) - set(FIELDS))
        if unknown:
            raise ConfigError(f"{where}: principles[{i}] has unknown key(s) {unknown}; allowed: {', '.join(FIELDS)}")
        for key in FIELDS:
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise ConfigError(f"{where}: principles[{i}].{key} must be a non-empty string")
        if item["name"] in names:
            raise ConfigError(f"{where}: principles[{i}]: the name {item['name']!r} is used twice")
        names.add(item["name"])
        principles.append(Principle(*(" ".join(item[k].split()) for k in FIELDS)))
    return principles


def pick(principles: list[Principle], seed: int, key: int) -> Principle:
    """The principle for item `key`: sampled, but the same on every run (a resumed file stays consistent)."""
    return principles[random.Random(seed * 1_000_003 + key).randrange(len(principles))]
