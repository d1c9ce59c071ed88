"""Append-only JSONL logs that survive being killed: what `caption --out`, `ask --out` and `eval --out` resume from.

Every record is one line, written and flushed at once, so a run loses at most the line being written when it is
killed. Reading skips such a cut-off last line and reopening for append removes it; any other line that is not a
JSON object is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blip2cli.errors import UsageError
from blip2cli.files import LineAppender, json_line


def _cut_partial_line(path: Path) -> None:
    """Truncate a last line without its newline (a write interrupted by a kill); it is redone by the rerun."""
    with path.open("r+b") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        data_start = max(size - (1 << 20), 0)  # records are short: look back at most 1 MiB for the last newline
        fh.seek(data_start)
        tail = fh.read()
        fh.truncate(data_start + tail.rfind(b"\n") + 1 if b"\n" in tail else 0)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete records of a log ([] when it does not exist yet)."""
    if not path.is_file():
        return []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    whole = data[: data.rfind(b"\n") + 1]  # a cut-off last line is left for JsonlLog to drop
    records = []
    for number, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise UsageError(f"{path}:{number}: not a JSON record; fix or delete the file to start over")
        records.append(record)
    return records


class JsonlLog:
    """Appends records to a JSONL file, one flushed line each."""

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                _cut_partial_line(path)
            self.fh = LineAppender(path)  # issue 10: whole lines only, DiskFull on a full disk
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.path = path
        self.written = 0

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json_line(record))  # issue 10: names that are not UTF-8 as \udcXX escapes
        self.written += 1

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
