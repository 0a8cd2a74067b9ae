"""The UI's working folder. Every path typed into the UI must lie inside it (no reading arbitrary files through
the UI); runs are the run directories under its runs folder, found on disk (so a reload, a second tab or a
restarted UI sees the same runs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ayar.errors import AyarError


class OutsideWorkspace(AyarError):
    pass


@dataclass
class Workspace:
    root: Path
    runs: Path

    @classmethod
    def open(cls, root: str | Path = ".", runs: str | Path = "runs") -> Workspace:
        root = Path(root).resolve()
        ws = cls(root, root)
        ws.runs = ws.path(runs, "--runs")
        ws.runs.mkdir(parents=True, exist_ok=True)
        return ws

    @property
    def jobs(self) -> Path:
        return self.runs / ".ayar-ui"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    def path(self, text: str | Path, field: str) -> Path:
        """`text` (relative to the working folder, or absolute inside it) as a resolved path; symlinks are
        followed first, so a link pointing out of the folder is refused too."""
        text = str(text).strip()
        if not text:
            raise OutsideWorkspace(f"{field}: give a path inside {self.root}")
        p = Path(text).expanduser()
        p = (p if p.is_absolute() else self.root / p).resolve()
        if p != self.root and self.root not in p.parents:
            raise OutsideWorkspace(
                f"{field}: {text} is outside the UI's working folder {self.root}; copy it in (or upload it), or "
                "start `ayar ui` in a folder that contains it"
            )
        return p

    def relative(self, path: str | Path) -> str:
        p = Path(path)
        return str(p.relative_to(self.root)) if p.is_absolute() and self.root in p.parents else str(p)

    def run_dirs(self) -> list[Path]:
        """The run directories under the runs folder (one level, or two for HPO trials), newest first."""
        found = [p.parent for pattern in ("*/run.json", "*/*/run.json") for p in self.runs.glob(pattern)]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def run(self, text: str, field: str = "run") -> Path:
        """A run directory named in the UI (its name under runs/, or a path in the working folder)."""
        text = str(text or "").strip()
        if not text:
            raise AyarError(f"{field}: choose a run")
        p = self.path(self.runs / text if (self.runs / text / "run.json").is_file() else text, field)
        if not (p / "run.json").is_file():
            raise AyarError(f"{field}: {text} is not a run directory (no run.json)")
        return p
