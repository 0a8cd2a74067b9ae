"""Where `ayar data clean|convert` may write: never an input, by any route, and an existing file only when asked."""

from __future__ import annotations

import fnmatch
from pathlib import Path

from ayar.data.dataset import parse_sources
from ayar.data.formats import detect_format, map_columns
from ayar.data.sources import is_glob, local_files, read_rows
from ayar.errors import DataError


def refuse_input_overwrite(data, out: str | Path, against=(), force: bool = False) -> None:
    """Inputs are never written, by any route: `out` may not be an input file (a file, a folder's file, a glob's
    match, a validation/test source, an `against` file), nor a new file inside an input folder or matching an
    input glob (the next read of that input would take it in). An existing output needs `force` (--force)."""
    target = Path(out).expanduser().resolve()
    specs = [src.path for src in parse_sources(data.train, data.format, data.columns)]
    for held in (data.validation, data.test):
        specs += [src.path for src in parse_sources(held, data.format, data.columns)] if held else []
    for spec in [*specs, *against]:
        spec = str(spec)
        if any(f.resolve() == target for f in local_files(spec)):
            raise DataError(f"--out {out} is an input file ({spec}); inputs are never modified: write to a new file")
        root = Path(spec).expanduser()
        if (root.is_dir() and target.is_relative_to(root.resolve())) or (
            is_glob(spec)
            and fnmatch.fnmatch(str(target), str(root.resolve()) if root.is_absolute() else str(Path.cwd() / root))
        ):
            raise DataError(
                f"--out {out} is inside the input {spec}: the next read of it would take in the output; write it "
                "somewhere else"
            )
    if target.exists() and not force:
        raise DataError(f"--out {out} exists: pass --force (force=True) to replace it, or choose a new file")


def input_format(data) -> str:
    """The format of the (first) input, for writing cleaned data back in kind."""
    src = parse_sources(data.train, data.format, data.columns)[0]
    if src.format != "auto":
        return src.format
    rows = read_rows(src.path, src.hub)[:20]
    return detect_format(map_columns(rows, src.columns) if src.columns else rows)
