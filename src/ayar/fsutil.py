"""Atomic writes: readers see the old content or the complete new one, never a half-written file or directory.
And ownership: a folder a user names as an output is written only when it is new or empty, or, with `force`,
when ayar wrote it before (it carries ayar's mark); nothing else a user owns is deleted or changed."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ayar.errors import AyarError

MARK = ".ayar-output"  # in every output folder ayar writes: what wrote it and its files (so --force may replace it)
AFTERWARDS = {"gate.json"}  # files ayar adds to its own output folders after writing them


def claim_output(final: Path, force: bool = False, flag: str = "--out") -> None:
    """Refuse to write the output folder `final` over anything but ayar's own previous output (with `force`)."""
    final = Path(final)
    if not final.exists():
        return
    if not final.is_dir():
        raise AyarError(f"{flag} {final} is a file, not a folder: choose a folder path")
    if not any(final.iterdir()):
        return
    mark = _read_mark(final)
    if mark is None:
        raise AyarError(
            f"{flag} {final} exists and holds files ayar did not write: ayar never deletes them. Choose a new or "
            "empty folder"
        )
    present = {str(f.relative_to(final)) for f in final.rglob("*") if f.is_file()}
    foreign = sorted(present - set(mark["files"]) - AFTERWARDS - {MARK})
    if foreign:
        raise AyarError(
            f"{flag} {final} holds ayar's earlier output ({mark['by']}) and files added since ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}): ayar never deletes those. Move them, or choose another folder"
        )
    if not force:
        raise AyarError(
            f"{flag} {final} holds an earlier output ({mark['by']}): pass --force to replace it, or choose another "
            "folder"
        )


@contextmanager
def atomic_directory(final: Path, fsync: bool = False, mark: str | None = None) -> Iterator[Path]:
    """Yield a hidden temp directory beside `final`; on success it takes `final`'s place. `mark`: what wrote
    it, kept in the folder with the list of its files (MARK), for `claim_output`. An earlier `final` is
    renamed aside first and deleted only after the new one is in place, so a kill at any moment leaves the
    old folder or the new one whole (a hidden `.old-*` at worst), never a half-deleted one under its name."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    old = None
    try:
        yield tmp
        if mark is not None:
            files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file())
            (tmp / MARK).write_text(json.dumps({"by": mark, "files": files}, indent=1) + "\n")
        if fsync:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            _fsync_dir(tmp)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
            os.replace(final, old / final.name)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None and not final.exists():  # put the earlier folder back: nothing is lost
                os.replace(old / final.name, final)
                old.rmdir()
            raise
        if fsync:
            _fsync_dir(final.parent)
        if old is not None:  # only now that the new folder is in place
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_atomic(path: Path, text: str, fsync: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path.parent)


def shareable(folder: Path) -> None:
    """Give a folder ayar just wrote (and everything in it) the usual permissions under the user's umask:
    temp directories are private (0700), a model folder is meant to be read by others (a server's user, a
    container). Only for folders ayar created whole: nothing of the user's is touched."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in Path(folder).rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def _read_mark(folder: Path) -> dict | None:
    try:
        mark = json.loads((folder / MARK).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(mark, dict) and isinstance(mark.get("by"), str) and isinstance(mark.get("files"), list)
    return mark if ok else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
