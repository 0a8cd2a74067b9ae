"""Progress display: a rich bar with loss, lr, tokens/s and ETA on a terminal; plain lines elsewhere."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int = 0, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.total = total_steps
        self.interactive = self.console.is_terminal
        self._last_print = 0.0
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.interactive,
        )
        self.task = self.bar.add_task("train", total=total_steps, completed=start_step, stats="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, eta_s: float, extra: str = "") -> None:
        stats = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s" + (f"  {extra}" if extra else "")
        self.bar.update(self.task, completed=step, stats=stats)
        now = time.time()
        if not self.interactive and not self.console.quiet and (now - self._last_print > 10 or step == self.total):
            self._last_print = now
            print(f"step {step}/{self.total}  {stats}  ETA {eta_s:.0f}s", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        self.console.print(text)
