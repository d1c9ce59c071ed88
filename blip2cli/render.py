"""All output goes through here: NDJSON records on stdout for machines, tables/progress/warnings on stderr.

Text that users supply (file names, questions, captions, messages quoting them) is never read as rich markup: a file
called `[red]x.jpg` prints as `[red]x.jpg`, and a path holding `[/]` cannot break a run. Warnings and errors are one
line each at any terminal width (and when stderr is a file). File names that are not UTF-8: see `blip2cli.files`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from blip2cli.files import json_line, printable

T = TypeVar("T")

# People read stderr; stdout is reserved for --json records.
console = Console(stderr=True, highlight=False)


def emit(record: dict[str, Any]) -> None:
    """Write one JSON object as one line on stdout and flush (scripts may read line by line)."""
    sys.stdout.write(json_line(record))
    sys.stdout.flush()


def plain(text: Any) -> str:
    """`text` safe to embed in rich markup: brackets escaped, undecodable file-name bytes as \\xNN."""
    return escape(printable(str(text)))


def note(message: str) -> None:
    """One line of information for people (no markup in `message`)."""
    console.print(plain(message), soft_wrap=True)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {plain(message)}", soft_wrap=True)


def error(message: str) -> None:
    console.print(f"[red]error:[/] {plain(message)}", soft_wrap=True)


def failed_input(path: str, message: str) -> None:
    """A failed input as one warning line, naming the path once (messages usually quote it already)."""
    warn(message if path in message else f"{path}: {message}")


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A readable table on stderr."""
    t = Table(title=None if title is None else plain(title), show_lines=False)
    for c in columns:
        t.add_column(plain(c), overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else plain(v) for v in row))
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
