"""All output goes through here. Results go to stdout: NDJSON records with --json; otherwise a rich table when
stdout is a terminal, and plain tab-separated lines (one result a line) when it is a pipe or a file, so
`blip2 caption x.jpg > out.txt` and `ans=$(blip2 ask x.jpg "...")` work. Progress bars, notes, warnings and errors
go to stderr.

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

# Progress, notes and warnings: stderr. Results: stdout (`results`, `lines`, `emit`).
console = Console(stderr=True, highlight=False)


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def line(*fields: Any) -> None:
    """One plain result line on stdout: fields joined by tabs (tabs and newlines inside a field become spaces;
    undecodable file-name bytes as \\xNN), flushed at once so a pipe sees each result as it comes."""
    text = "\t".join(printable(" ".join(str(f).split("\t")).replace("\n", " ")) for f in fields)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def results(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Results for people: a table on stdout when it is a terminal, else one tab-separated line per row."""
    if stdout_is_terminal():
        _print_table(Console(highlight=False), title, columns, rows)
    else:
        for row in rows:
            line(*("" if v is None else v for v in row))


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
    """A readable table on stderr (summaries beside the results)."""
    _print_table(console, title, columns, rows)


def _print_table(where: Console, title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=None if title is None else plain(title), show_lines=False)
    for c in columns:
        t.add_column(plain(c), overflow="fold")
    for row in rows:
        t.add_row(*("" if v is None else plain(v) for v in row))
    where.print(t)


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
