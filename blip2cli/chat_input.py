"""The questions of `ask --chat`: typed at a terminal, or read one a line from a pipe or a file.

At a terminal, lines are read with the standard library's `readline` (through `input`), so the arrow keys move
the cursor, Home/End/Ctrl-A/Ctrl-E and the other Emacs keys edit the line, and Up/Down recall the session's
earlier questions instead of inserting `^[[D`. The history is kept for the session only: questions about
people's photos are not written to a file nobody asked for. A one-line hint on stderr says how to finish; Ctrl-D
ends the line cleanly (no prompt left dangling), Ctrl-C ends the conversation as an interruption.

When stdout is a pipe or a file (`blip2 ask x.jpg --chat > answers.txt`), the prompt and the editing show on
stderr's terminal and the answers stay alone on stdout. Without a terminal, lines are read as they come, with no
prompt.

  questions(first)     the first question (from the command line, if any), then each line until an empty line,
                       exit, quit or end of input
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

FINISH = ("", "exit", "quit")
HINT = "type a question and press Enter; an empty line, exit or Ctrl-D to finish"


def questions(first: str | None = None) -> Iterator[str]:
    """Questions in order: `first`, then one per line from stdin until an empty line, exit, quit or EOF."""
    read = _typed() if sys.stdin.isatty() else _piped
    if first is not None:
        yield first
    while (line := read()) is not None and line.strip().lower() not in FINISH:
        yield line.strip()


def _piped() -> str | None:
    line = sys.stdin.readline()
    return line if line else None


def _typed() -> Callable[[], str | None]:
    """A reader of lines typed at a terminal, after the hint; one without editing when no output is a terminal."""
    from blip2cli.render import note

    if not (sys.stdout.isatty() or sys.stderr.isatty()):
        return _piped  # typing blind, both outputs going to files: read as from a pipe
    note(HINT)
    try:
        import readline  # noqa: F401  (loading it is what gives input() line editing and history)
    except ImportError:  # a Python built without it: input() still reads lines, and cannot hide escape codes
        readline = None
    prompt = _prompt(colour=readline is not None and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb")

    def read() -> str | None:
        with _stdout_on_terminal():
            try:
                return input(prompt)
            except EOFError:  # Ctrl-D at the start of a line
                print()  # the shell's prompt starts on its own line, not after ours
                return None
            except KeyboardInterrupt:  # the caller says "interrupted"; first end the line the prompt is on
                print()
                raise

    return read


@contextmanager
def _stdout_on_terminal() -> Iterator[None]:
    """input() edits with readline only when stdin and stdout are both the terminal. When stdout is a pipe or a
    file (the answers go there) and stderr is the terminal, file descriptor 1 is pointed at stderr's terminal
    while the line is read, then back: the prompt and the editing show on the terminal, the answers stay alone."""
    if sys.stdout.isatty():
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _prompt(colour: bool) -> str:
    """`question> `, in bold at a colour terminal. The escape codes sit between \\001 and \\002, which tells readline
    they take no room on the screen: without them it misplaces the cursor when a long line wraps or is recalled."""
    return "\001\033[1m\002question>\001\033[0m\002 " if colour else "question> "
