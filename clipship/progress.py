"""Progress bars for long commands: rich, on stderr, only on a terminal (never in logs or pipes).

On an error the bars vanish, so the command's one-line error message stands alone.
"""

from __future__ import annotations

from typing import Any


class Bars:
    """``with Bars(quiet, "elapsed") as bars: task = bars.add("merging", 71); bars.advance(task)``.

    Extra columns after description, bar and count: ``"elapsed"``, ``"remaining"``, ``"rate"``
    (a ``rate`` field given to ``add`` and ``advance``).
    """

    def __init__(self, quiet: bool, *extra: str):
        from rich.console import Console

        self.bar = None
        console = Console(stderr=True)
        if not quiet and console.is_terminal:
            from rich import progress as rp

            columns = {
                "elapsed": rp.TimeElapsedColumn,
                "remaining": rp.TimeRemainingColumn,
                "rate": lambda: rp.TextColumn("{task.fields[rate]}"),
            }
            self.bar = rp.Progress(
                rp.TextColumn("{task.description}"),
                rp.BarColumn(),
                rp.MofNCompleteColumn(),
                *(columns[name]() for name in extra),
                console=console,
            )

    def __enter__(self) -> Bars:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if self.bar:
            if kind is not None:
                self.bar.live.transient = True
            self.bar.stop()

    def add(self, label: str, total: int, **fields: Any) -> int | None:
        return self.bar.add_task(label, total=total, **fields) if self.bar else None

    def advance(self, task: int | None, n: int = 1, **fields: Any) -> None:
        if self.bar is not None and task is not None:
            self.bar.update(task, advance=n, **fields)
