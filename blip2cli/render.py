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
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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


def progress(
    items: Iterable[T],
    total: int | None,
    description: str,
    unit: str = "images",
    *,
    done: str | None = None,
    size: Callable[[T], int] | None = None,
    threshold: int = 4,
) -> Iterator[T]:
    """Iterate with a progress bar on stderr when there is more than a handful of work: `total` counts `unit`s
    (images, questions, texts), each item is `size(item)` of them (a batch: its length; default 1). The bar shows
    the count, the time spent and the time left; when the loop ends, one line says how fast it went:
    "captioned 79 images in 41.2 s (1.9 images/s)" (`done`, else `description`, in front)."""
    if total is not None and total <= threshold:
        yield from items
        return
    from rich.progress import Progress

    count, started = 0, time.perf_counter()
    with Progress(*bar_columns("{task.description}", unit), console=console, transient=False) as bar:
        task = bar.add_task(plain(description), total=total)
        for item in items:
            yield item
            step = 1 if size is None else size(item)
            count += step
            bar.advance(task, step)
    note(rate_line(done or description, count, unit, time.perf_counter() - started))


def bar_columns(description: str, unit: str, bar_width: int = 30) -> list[Any]:
    """What a progress bar shows: `description` (rich markup), the bar, "M/N unit", the time spent and the time left.
    Only the bar may shrink, so a narrow terminal (or a log file, 80 columns) still shows the counts."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.table import Column

    def fixed() -> Column:
        return Column(no_wrap=True)

    return [TextColumn(description, table_column=fixed()), BarColumn(bar_width=bar_width),
            MofNCompleteColumn(table_column=fixed()), TextColumn(plain(unit), table_column=fixed()),
            TimeElapsedColumn(table_column=fixed()), TextColumn("eta", table_column=fixed()),
            TimeRemainingColumn(table_column=fixed())]


def rate_line(done: str, count: int, unit: str, seconds: float) -> str:
    """ "captioned 79 images in 41.2 s (1.9 images/s)" """
    per_s = count / seconds if seconds > 0 else 0.0
    rate = f" ({per_s:.1f} {unit}/s)" if per_s >= 0.95 else f" ({per_s:.2g} {unit}/s)" if per_s else ""
    return f"{done} {count} {unit} in {seconds:.1f} s{rate}"


def wrote(path: Any, records: int | None = None) -> None:
    """Say what was written, one line: "wrote hits.html", "wrote 79 records to captions.jsonl"."""
    if records is None:
        note(f"wrote {path}")
    else:
        note(f"wrote {records} record{'' if records == 1 else 's'} to {path}")
