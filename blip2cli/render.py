"""All output goes through here: NDJSON records on stdout for machines, tables/progress/warnings on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

T = TypeVar("T")

# People read stderr; stdout is reserved for --json records.
console = Console(stderr=True, highlight=False)


def emit(record: dict[str, Any]) -> None:
    """Write one JSON object as one line on stdout and flush (scripts may read line by line)."""
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def error(message: str) -> None:
    console.print(f"[red]error:[/] {message}", soft_wrap=True)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A readable table on stderr."""
    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else str(v) for v in row))
    console.print(t)


def progress(items: Iterable[T], total: int | None, description: str, threshold: int = 4) -> Iterator[T]:
    """Iterate with a progress bar on stderr when there is more than a handful of work."""
    if total is not None and total <= threshold:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    ) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)
