"""A progress bar for long loops that stays silent when the loop is short.

Calibration runs, Hessian collection and the per-layer GPTQ/AWQ loops all count work items
the same way: nothing is printed until ``after_s`` seconds have passed (short runs and
tests print nothing), then a rich bar on stderr shows done/total, the elapsed time and
optionally the item being worked on. Transient on a terminal, kept in logs.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class LazyProgress:
    """Counts done items; a rich bar appears on stderr once ``after_s`` have passed.

    Args:
        title: Shown before the bar (``calibrating``, ``gptq``).
        total: Items to process (``None``: unknown).
        unit: Shown after the count (``samples``, ``layers``).
        after_s: Seconds before the bar appears.
    """

    def __init__(self, title: str, total: int | None, unit: str, after_s: float = 3.0) -> None:
        self.title = title
        self.total = total
        self.unit = unit
        self.after_s = after_s
        self.count = 0
        self.started = time.perf_counter()
        self._progress: Any = None
        self._task: Any = None

    def advance(self, item: str = "") -> None:
        """One more item done; ``item`` names it in the bar."""
        self.count += 1
        if self._progress is None:
            if time.perf_counter() - self.started < self.after_s:
                return
            self._start()
        self._progress.update(self._task, completed=self.count, item=item[-48:])

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(file=sys.stderr)
        self._progress = Progress(
            TextColumn(self.title),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(self.unit),
            TimeElapsedColumn(),
            TextColumn("{task.fields[item]}"),
            console=console,
            transient=console.is_terminal,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.title, total=self.total, item="")

    def close(self) -> None:
        """Stops the bar (if shown)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=self.count)
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> LazyProgress:  # noqa: PYI034 - not meant to be subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
