"""The one progress bar of every long command: description, bar, done/total, any extra columns,
elapsed and remaining time, on stderr (stdout carries a command's result, one JSON line)."""

from __future__ import annotations


def progress_bar(*extra_columns, enabled: bool = True, transient: bool = False):
    """A ``rich.progress.Progress``; ``extra_columns`` are rich columns or format strings such as
    ``"kept {task.fields[kept]}"`` (every task then needs that field)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    extras = [TextColumn(c) if isinstance(c, str) else c for c in extra_columns]
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), *extras,
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=transient,
                    console=Console(stderr=True))


def rate_column(unit: str):
    """A column with the task's speed in ``unit``/s."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.2f} {unit}/s" if speed else f"? {unit}/s", style="progress.data.speed")

    return Rate()
