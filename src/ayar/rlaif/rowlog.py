"""A JSONL file written one row at a time so that a killed run loses at most the row being written, and a rerun
finishes it: rows carry an `id`; rows that were tried and skipped go to a `.skipped.jsonl` file beside it, so a
rerun neither repeats nor loses them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ayar.errors import AyarError


class RowLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.skipped_path = self.path.with_name(self.path.stem + ".skipped.jsonl")
        self.rows = _read(self.path)
        self.skipped = _read(self.skipped_path)
        self._done = {r["id"] for r in (*self.rows, *self.skipped)}

    def done(self) -> set[int]:
        return self._done

    def check_prompts(self, prompts: list) -> None:
        """A resumed file must belong to the prompts given now: a changed prompt file would mix two datasets."""
        for r in (*self.rows, *self.skipped):
            if not 0 <= r["id"] < len(prompts) or r.get("prompt") != prompts[r["id"]]:
                raise AyarError(
                    f"{self.path}: row {r['id']} was made for another prompt than the prompts given now: the prompts "
                    "changed since this file was started. Use a new `out` folder (or remove this one)."
                )

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._done.add(row["id"])
        _append(self.path, row)

    def skip(self, key: int, prompt, reason: str, detail: str = "") -> None:
        row = {"id": key, "prompt": prompt, "reason": reason, "detail": detail}
        self.skipped.append(row)
        self._done.add(key)
        _append(self.skipped_path, row)

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.skipped:
            out[r["reason"]] = out.get(r["reason"], 0) + 1
        return out


def _append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")  # one write: a kill leaves a whole line or a cut one
        f.flush()
        os.fsync(f.fileno())


def _read(path: Path) -> list[dict]:
    """The whole rows of `path`; a last line cut short by a kill is removed from the file (it is redone)."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for n, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise AyarError(f"{path}:{n}: not a JSON row; this file is ayar's own output, was it edited?") from None
    return rows
