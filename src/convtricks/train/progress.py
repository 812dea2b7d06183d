"""A live progress bar for the steps of an epoch, on a terminal only (logs get the epoch line)."""

from __future__ import annotations

import sys


class StepProgress:
    def __init__(self, title: str, steps: int):
        self._progress = None
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("loss {task.fields[loss]:.4f}"), transient=True)
            self._progress.start()
            self._task = self._progress.add_task(title, total=steps, loss=0.0)

    def advance(self, loss: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=loss)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
