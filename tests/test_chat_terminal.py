"""`ask --chat` at a real terminal (issue 12): a pseudo-terminal drives `python -m blip2cli` as a person would, with
arrow keys, Ctrl-D and Ctrl-C, on a tiny offline model."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import IO

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # a process that imports torch and loads a model: ~10 s on a busy 2-core machine

LEFT, UP, CTRL_D, CTRL_C = "\x1b[D", "\x1b[A", "\x04", "\x03"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x01\x02]")


def _take_terminal() -> None:
    """In the child, after setsid: the pseudo-terminal becomes its controlling terminal, so Ctrl-C is SIGINT."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`command` on a fresh 24x100 pseudo-terminal (stdin, stdout and stderr), read and typed into."""

    def __init__(self, command: list[str], stdout: IO[str] | None = None) -> None:
        self.fd, tty = os.openpty()
        fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        env = {**os.environ, "TERM": "xterm", "OMP_NUM_THREADS": "1", "COLUMNS": "100"}
        env.pop("NO_COLOR", None)
        self.process = subprocess.Popen(command, stdin=tty, stdout=stdout or tty, stderr=tty, env=env,
                                        start_new_session=True, preexec_fn=_take_terminal)
        os.close(tty)
        self.seen = ""

    def read_until(self, text: str, timeout: float = 120.0) -> str:
        """Everything shown so far (escape codes removed) once `text` appears after what was already read."""
        start, deadline = len(self.text), time.monotonic() + timeout
        while text not in self.text[start:]:
            if time.monotonic() > deadline or self.process.poll() is not None and not self._pending():
                raise AssertionError(f"never saw {text!r}; the terminal shows:\n{self.text}")
            self._pending(timeout=0.2)
        return self.text

    def _pending(self, timeout: float = 0.0) -> bool:
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # the other side is closed
            return False
        self.seen += data.decode("utf-8", errors="replace")
        return bool(data)

    @property
    def text(self) -> str:
        return ANSI.sub("", self.seen)

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def finish(self, timeout: float = 60.0) -> int:
        """The exit code, once the process ended (what it still prints is read meanwhile)."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running; the terminal shows:\n{self.text}")
            self._pending(timeout=0.2)
        while self._pending(timeout=0.1):
            pass
        os.close(self.fd)
        return self.process.returncode


def chat_command(model: Path, folder: Path) -> list[str]:
    Image.new("RGB", (40, 30), "red").save(folder / "red.png")
    return [sys.executable, "-m", "blip2cli", "ask", str(folder / "red.png"), "--chat", "--model", str(model),
            "--device", "cpu", "--max-new-tokens", "3", "--out", str(folder / "chat.jsonl")]


@pytest.fixture
def chat(tiny_opt_dir: Path, tmp_path: Path):
    terminal = Terminal(chat_command(tiny_opt_dir, tmp_path))
    yield terminal, tmp_path / "chat.jsonl"
    if terminal.process.poll() is None:
        terminal.process.kill()
        terminal.process.wait()


def test_arrow_keys_edit_the_question_up_recalls_it_and_ctrl_d_ends_cleanly(chat) -> None:
    terminal, log = chat
    shown = terminal.read_until("question> ")
    assert "an empty line, exit or Ctrl-D to finish" in shown  # the hint, once, before the first prompt
    terminal.type("what colour is?" + LEFT + " it" + "\r")  # the cursor moved back before "?": an edit
    shown = terminal.read_until("question> ")  # the answer, then the next prompt
    assert "answer> " in shown and "^[[D" not in shown and "[D" not in shown
    terminal.type(UP + "\r")  # the session's history: the same question again
    terminal.read_until("question> ")
    terminal.type(CTRL_D)
    assert terminal.finish() == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["question"] for r in records] == ["what colour is it?"] * 2  # the edit applied, no escape codes
    assert records[0]["answer"] and f"answer> {records[0]['answer']}" in terminal.text
    after = terminal.seen.rsplit("question>", 1)[1]
    # Ctrl-D ended the prompt's line; then only the note naming what --out holds
    assert ANSI.sub("", after).strip(" ") == f"\r\nwrote 2 records to {log}\r\n"
    assert "Traceback" not in terminal.text


def test_ctrl_c_at_the_prompt_says_interrupted(chat) -> None:
    terminal, log = chat
    terminal.read_until("question> ")
    terminal.type("is it red?\r")
    terminal.read_until("question> ")
    terminal.type("half a quest")
    terminal.read_until("half a quest")  # readline has it (Ctrl-C at once would flush it unread)
    time.sleep(0.5)  # as a person pauses: a signal while readline is still echoing waits for the next key (CPython)
    terminal.type(CTRL_C)
    assert terminal.finish() == 130
    shown = terminal.text
    assert "Traceback" not in shown
    last = shown.rsplit("question> ", 1)[1]  # the line typed, then the message on its own line below it
    assert re.fullmatch(r"half a quest(\^C)?\r\nerror: interrupted; 1 records are saved in \S+chat.jsonl, "
                        r"rerun the same command to go on\r\n", last), last


def test_answers_redirected_to_a_file_and_the_line_still_edits(tiny_opt_dir: Path, tmp_path: Path) -> None:
    """`blip2 ask x.jpg --chat > answers.txt`: prompt and editing on the terminal, the answers alone in the file."""
    with (tmp_path / "answers.txt").open("w") as answers:
        terminal = Terminal(chat_command(tiny_opt_dir, tmp_path), stdout=answers)
        try:
            terminal.read_until("question> ")
            terminal.type("is it?" + LEFT + " red\r")
            terminal.read_until("question> ")
            terminal.type(CTRL_D)
            assert terminal.finish() == 0
        finally:
            if terminal.process.poll() is None:
                terminal.process.kill()
    records = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert [r["question"] for r in records] == ["is it red?"]
    assert (tmp_path / "answers.txt").read_text() == records[0]["answer"] + "\n"
    assert "answer>" not in terminal.text and "Traceback" not in terminal.text
