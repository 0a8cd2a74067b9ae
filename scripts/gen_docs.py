"""Rewrite the generated blocks of docs/: the config reference and the alias table (`make docs`).
Tests fail when a committed copy is stale (tests/unit/config/test_config.py, test_aliases.py)."""

import re
import sys
from pathlib import Path

from ayar.config.reference import alias_reference, config_reference

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCKS = {
    "config.md": ("config-reference", config_reference),
    "config-aliases.md": ("alias-reference", alias_reference),
}


def main() -> int:
    for name, (marker, generate) in BLOCKS.items():
        path = DOCS / name
        text = path.read_text()
        pattern = re.compile(rf"(<!-- {marker}:start -->\n).*?(<!-- {marker}:end -->)", re.S)
        if not pattern.search(text):
            sys.exit(f"{path}: no <!-- {marker}:start --> ... <!-- {marker}:end --> block")
        new = pattern.sub(lambda m: m.group(1) + generate() + m.group(2), text)
        if new != text:
            path.write_text(new)
            print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
