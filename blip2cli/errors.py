"""User-facing failures: one line, a fixed exit code, no traceback."""

from __future__ import annotations

from dataclasses import dataclass


class UsageError(Exception):
    """A mistake the user can fix (bad flag, missing file, invalid recipe, unknown model). Exit code 2."""

    exit_code = 2


class DiskFull(UsageError):
    """A write failed for lack of space (one line: "no space left on DEVICE ..."). Exit code 1: what was written
    before is kept, nothing is half-written, and a rerun with free space goes on."""

    exit_code = 1


class Interrupted(UsageError):
    """Ctrl-C: one line saying what was saved and how to go on. Exit code 130, the shell's code for SIGINT."""

    exit_code = 130


class InputError(Exception):
    """One input (an image, a line of a file) could not be used; the rest still run. Exit code 1 at the end."""

    exit_code = 1


@dataclass(frozen=True)
class Failure:
    """A per-item failure record, rendered as {"<kind>": path, "error": message}."""

    path: str
    error: str
