"""Append-only JSONL logs that survive being killed: what `caption --out`, `ask --out` and `eval --out` resume from.

Every record is one line, written and flushed at once, so a run loses at most the line being written when it is
killed. Reading skips such a cut-off last line and reopening for append removes it; any other line that is not a
JSON object is an error.

  JsonlLog(path)                          append, one flushed line per record
  ResumeLog(path, key, settings)          the same, resumable: knows the records already there (by key), refuses
                                          a log written with other settings, adds nothing a rerun already wrote
                                          and replaces an error record once its item succeeds
  run_resumable(items, key, ..., log)     predict in batches, reusing the records a log already holds
  check_settings(path, settings, what)    the settings file beside a log: written once, then compared
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from blip2cli.errors import UsageError
from blip2cli.files import LineAppender, atomic_write_text, json_line
from blip2cli.render import progress

T = TypeVar("T")
Key = Callable[[dict[str, Any]], Hashable | None]


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

    def open(self) -> JsonlLog:
        return self  # open from the start (a ResumeLog opens on first use)

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json_line(record))  # issue 10: names that are not UTF-8 as \udcXX escapes
        self.written += 1

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_settings(path: Path, settings: dict[str, Any], what: str, partial: bool = False) -> None:
    """Refuse to resume `what` when the settings file `path` records other settings (its records would be mixed
    in). `partial`: compare only the keys of `settings` (those known before a model loads). Reads only:
    `save_settings` writes the file once the run starts."""
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        before = None
    if not isinstance(before, dict):
        raise UsageError(f"{path}: not a settings file; delete it to start {what} over")
    if partial:
        before = {k: v for k, v in before.items() if k in settings}
    changed = changed_settings(before, settings)
    if changed:
        raise UsageError(f"--out: {what} was written with other settings ({changed}); "
                         "use another --out or delete it")  # fmt: skip


# Settings recorded only since a later version, with the value every file written before then was made with.
ADDED_LATER: dict[str, Any] = {"quantize": "none"}


def changed_settings(before: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between recorded and current settings, for a one-line refusal: 'quantize: "int8" there,
    "none" now' for short values, the key alone for long ones; "" when nothing does."""
    before = {**{k: v for k, v in ADDED_LATER.items() if k in now}, **before}
    parts = []
    for k in sorted(set(before) | set(now)):
        old, new = before.get(k), now.get(k)
        if old == new:
            continue
        short = all(isinstance(v, str | int | float | None) and len(str(v)) <= 40 for v in (old, new))
        parts.append(f"{k}: {json.dumps(old)} there, {json.dumps(new)} now" if short else k)
    return "; ".join(parts)


def save_settings(path: Path, settings: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


def settings_path(log: Path) -> Path:
    """Where the settings of a `caption --out` / `ask --out` file live: `captions.jsonl` -> `captions.settings.json`."""
    return log.with_name(f"{log.stem}.settings.json")


class ResumeLog(JsonlLog):
    """A JSONL log a rerun continues: `done` holds the successful records by `key`, `failed` the error records.

    Creating one only reads (and refuses a log written with other `settings`); `open()`, or the first `write`,
    creates the file and saves the settings beside it. Writing a record identical to one already there adds
    nothing; a record for an item that had failed replaces the error record (the file is rewritten atomically),
    so reruns never grow a log with repeats."""

    def __init__(self, path: Path, key: Key, settings: dict[str, Any] | None = None,
                 settings_file: Path | None = None) -> None:  # fmt: skip
        self.settings, self.settings_file = settings, settings_file or settings_path(path)
        if settings is not None:
            check_settings(self.settings_file, settings, str(path))
        self.path, self.key, self.written = path, key, 0
        self.done: dict[Hashable, dict[str, Any]] = {}
        self.failed: dict[Hashable, dict[str, Any]] = {}
        for record in read_jsonl(path):
            if (k := key(record)) is not None:
                (self.failed if "error" in record else self.done)[k] = record
                (self.done if "error" in record else self.failed).pop(k, None)
        self.fh: Any = None

    def open(self) -> ResumeLog:
        if self.fh is None:
            if self.settings is not None and not self.settings_file.is_file():
                save_settings(self.settings_file, self.settings)
            super().__init__(self.path)
        return self

    def pending(self, items: Sequence[T], key: Callable[[T], Hashable]) -> list[T]:
        """The items without a successful record yet (failed ones are retried)."""
        return [item for item in items if key(item) not in self.done]

    def write(self, record: dict[str, Any]) -> None:
        self.open()
        k = self.key(record)
        if k is not None and (self.done.get(k) == record or self.failed.get(k) == record):
            return  # a rerun that changes nothing adds nothing
        if k is not None and k in self.failed:
            self._drop(k)
        if k is not None:
            (self.failed if "error" in record else self.done)[k] = record
        super().write(record)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()

    def _drop(self, k: Hashable) -> None:
        """Rewrite the log without the error record of `k` (temp file + rename: a kill leaves the old or the new)."""
        self.fh.close()
        keep = [r for r in read_jsonl(self.path) if not ("error" in r and self.key(r) == k)]
        atomic_write_text(self.path, "".join(json_line(r) for r in keep))
        del self.failed[k]
        self.fh = LineAppender(self.path)


def run_resumable(
    items: Sequence[T],
    key: Callable[[T], Hashable],
    key_field: str,
    predict: Callable[[list[T]], list[dict[str, Any]]],
    batch_size: int,
    log: Path | None,
    description: str,
    unit: str = "images",
    done_verb: str | None = None,
) -> dict[Hashable, dict[str, Any]]:
    """Predict in batches, appending each record to `log` (JSONL) as it comes; records already there are reused.
    The progress bar counts `unit`s (one per item), not batches."""
    writer = ResumeLog(log, lambda r: r.get(key_field)) if log else None
    done: dict[Hashable, dict[str, Any]] = dict(writer.done) if writer else {}
    todo = [item for item in items if key(item) not in done]
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    try:
        for batch in progress(batches, len(todo), description, unit, done=done_verb, size=len):
            for record in predict(batch):
                done[record[key_field]] = record
                if writer:
                    writer.write(record)
    finally:
        if writer:
            writer.close()
    return done
