"""Reading and writing files as users' disks really are: named pipes, devices, full disks.

  open_regular(path)        read only regular files: a named pipe or /dev/zero never blocks or streams forever
  atomic_write(path, fn)    temp file + fsync + rename: readers see the old file or the new, never half of one;
                            the temp file is removed when writing fails
  LineAppender(path)        whole lines or nothing: a line cut off by a full disk is truncated away
  disk_full(path, needed)   ENOSPC / EDQUOT / SQLITE_FULL -> DiskFull, one line: "no space left on DEVICE ..."
  json_line / printable     file names that are not UTF-8 in JSON and on terminals (below)

File names are bytes; Python gives a byte that is not UTF-8 as a lone surrogate U+DC80..U+DCFF ("surrogateescape",
so `open()` still finds the file). Outputs keep such names intact and valid UTF-8:
- JSON (--json, --out files, index exports): the JSON escape "\udcff" for the byte 0xff. `json.loads` gives the
  same string back and `os.fsencode` the original bytes (jq shows U+FFFD); everything else stays as it is.
- text for people (terminal, HTML, parquet metadata): "\xff", as Python's backslashreplace writes it.

`errors.DiskFull` is a `UsageError` with exit code 1 (the user frees space and reruns; the work done is kept), so
every command reports it as one line without a traceback.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from blip2cli.errors import DiskFull, InputError, UsageError

# No image is larger: PIL's hard pixel limit (~179 MP) as uncompressed 16-bit RGB is ~1.07 GB.
MAX_INPUT_BYTES = 2 << 30

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Reading


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is ("a named pipe", "a device", ...)."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular(path: str | Path, st: os.stat_result, max_bytes: int = MAX_INPUT_BYTES) -> None:
    """InputError unless `st` (of `path`) is a regular file within the size limit."""
    kind = file_kind(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"not an image (a folder): {path}")
    if kind is not None:
        raise InputError(f"not a regular file ({kind}): {path}")
    if st.st_size > max_bytes:
        raise InputError(f"file too large: {st.st_size / 1e9:.1f} GB (limit {max_bytes / 1e9:.1f} GB): {path}")


def open_regular(path: str | Path, max_bytes: int = MAX_INPUT_BYTES) -> BinaryIO:
    """Open a regular file for reading, or raise InputError with one line saying why not.

    The open is non-blocking (a named pipe with no writer would block forever) and what was opened is checked with
    fstat (a symlink to /dev/zero is a device, whatever its name); for a regular file O_NONBLOCK changes nothing."""
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise InputError(os_error_message(name, exc)) from None
    try:
        check_regular(name, os.fstat(fd), max_bytes)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def os_error_message(name: str, exc: OSError) -> str:
    """One line for a file that cannot be opened or stat'ed."""
    if exc.errno == errno.ELOOP:
        return f"symlink loop: {name}"
    if exc.errno == errno.ENOENT:
        return f"broken symlink (its target does not exist): {name}" if os.path.islink(name) else f"no such file: {name}"
    if exc.errno == errno.ENOTDIR:
        return f"no such file: {name}"
    if exc.errno == errno.EISDIR:
        return f"not an image (a folder): {name}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot read (permission denied): {name}"
    return f"cannot read {name}: {exc.strerror or exc}"


# ---------------------------------------------------------------------------------------------------------------
# Writing


def is_disk_full(exc: BaseException, where: str | Path | None = None) -> bool:
    """ENOSPC/EDQUOT from the OS, SQLite's "database or disk is full", a library's message quoting ENOSPC, or (for
    libraries whose message says nothing, torch.save: "unexpected pos") less than 1 MB left on `where`'s disk."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in _NO_SPACE
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
        return True
    if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
        return False
    if any(text in str(exc) for text in ("No space left", "os error 28", "disk is full", "Disk quota")):
        return True
    if where is not None:
        try:
            return shutil.disk_usage(mount_point(Path(where))).free < 1 << 20
        except OSError:
            return False
    return False


def disk_full(path: str | Path, needed: int = 0) -> DiskFull:
    """The one-line error for a write to `path` that ran out of space; `needed`: bytes the write wanted."""
    where = mount_point(Path(path))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = 0
    wanted = f": {_mb(needed)} needed" if needed else ""
    return DiskFull(f"no space left on {where}{wanted} ({free / 1e6:.1f} MB free) writing {path}; free some space and rerun "
                    "(what was written before is kept)")  # fmt: skip


def mount_point(path: Path) -> str:
    """The mount point holding `path` (the nearest existing folder above it that is one)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return str(p)


def _mb(n: int) -> str:
    return f"{math.ceil(n / 1e6)} MB" if n >= 1e6 or n == 0 else "1 MB"


def atomic_write(path: Path, write: Callable[[BinaryIO], Any], needed: int = 0) -> None:
    """Write a new file next to `path`, fsync it, then rename over: readers see the old or the new, never half.
    On any failure the temp file is removed and `path` is untouched; a full disk raises DiskFull."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc, path.parent):
            raise disk_full(path, needed) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data), len(data))


class LineAppender:
    """Appends whole lines to a file (one write each, flushed to the OS). A write the disk cannot hold is cut back
    off, so the file never ends in half a line, and raises DiskFull."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd = os.open(self.path, flags, 0o644)  # non-blocking: a named pipe with no reader fails, not hangs
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise UsageError(f"cannot write {path}: not a regular file (a named pipe)") from None
            raise
        kind = file_kind(os.fstat(self._fd).st_mode)
        if kind is not None:
            os.close(self._fd)
            raise UsageError(f"cannot write {path}: not a regular file ({kind})")
        os.set_blocking(self._fd, True)

    def write(self, line: str) -> None:
        data = line.encode("utf-8")
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            os.ftruncate(self._fd, start)  # frees what the partial write took
            if is_disk_full(exc):
                raise disk_full(self.path, len(data)) from None
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# ---------------------------------------------------------------------------------------------------------------
# File names in outputs

_SURROGATE = re.compile("[\ud800-\udfff]")


def json_line(record: dict[str, Any]) -> str:
    """One JSON object and a newline, non-ASCII text as is, undecodable file-name bytes as "\\udcXX" escapes."""
    text = json.dumps(record, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


def printable(text: str) -> str:
    """`text` with each undecodable byte of a file name shown as "\\xNN" (valid UTF-8 for any terminal)."""
    return _SURROGATE.sub(_byte_escape, text)


def _byte_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"
