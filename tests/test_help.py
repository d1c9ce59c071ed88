"""Every command's --help reads like a well-kept click CLI, at 80 and 120 columns: no `<bool>` or `<type>` labels,
`INPUTS...` (not `{inputs}...`) in the usage line, every option listed, and text wrapped greedily (no line broken
early in a paragraph or a table cell, which is what hard line breaks kept from docstrings look like)."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.cli_help import metavar, rewrap

runner = CliRunner()
TYPER_LABEL = re.compile(r"<(bool|int|float|str|path|file|directory|list)[^>]*>")


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


def test_every_command_is_checked() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"", "caption", "ask", "index", "search", "capfilt", "pretrain", "finetune", "env", "eval",
            "eval caption", "eval vqa", "eval retrieval"} <= names


def _help(path: tuple[str, ...], width: int) -> list[str]:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) == width  # rich laid it out for this terminal
    return lines


def _early_breaks(lines: list[str], start: int, width: int) -> list[str]:
    """Lines of a text block (text from column `start`, at most `width` wide) where the next line's first word
    would have fit: a greedy wrap never leaves that gap, a hard line break does."""
    bad = []
    for line, after in zip(lines, lines[1:]):
        text, following = line[start:start + width].rstrip(), after[start:].split()
        if text and following and not following[0].startswith("[") and len(text) + 1 + len(following[0]) <= width:
            bad.append(f"{text!r} then {following[0]!r}")
    return bad


def _description(lines: list[str], width: int) -> list[str]:
    """Early breaks in the help text above the panels (paragraphs split by blank lines, one space of padding)."""
    body = [line for line in lines[: next(i for i, x in enumerate(lines) if x.startswith("╭"))]]
    bad, paragraph = [], []
    for line in body + [""]:
        if line.strip():
            paragraph.append(line)
        else:
            bad += _early_breaks(paragraph, 1, width - 2)
            paragraph = []
    return bad


def _panels(lines: list[str], width: int) -> list[str]:
    """Early breaks in the last column (help text) of each option and command panel, row by row."""
    bad, panel = [], []
    for line in lines:
        if line.startswith("╭"):
            panel = []
        elif line.startswith("╰"):
            inner = [x[: width - 2] for x in panel]
            indents = [len(x) - len(x.lstrip()) for x in inner if x.strip()]
            start = max(indents) if len(set(indents)) > 1 else None  # continuation lines start at the help column
            if start is not None:
                rows: list[list[str]] = []
                for x in inner:
                    if x[:start].strip() or not rows:
                        rows.append([])
                    rows[-1].append(x)
                column = max(len(x[start:].rstrip()) for x in inner)  # the help column's width, as rich laid it out
                for row in rows:
                    bad += _early_breaks(row, start, column)
        elif line.startswith("│"):
            panel.append(line[1:])
    return bad


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) or "blip2" for p, _ in COMMANDS])
def test_help_reads_well(path, command, width: int) -> None:
    lines = _help(path, width)
    text = "\n".join(lines)
    assert not TYPER_LABEL.search(text), TYPER_LABEL.search(text).group()
    usage = next(line for line in lines if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage
    for param in command.params:
        for opt in param.opts + param.secondary_opts if isinstance(param, typer.core.TyperOption) else []:
            assert re.search(rf"(^|[\s,]){re.escape(opt)}([\s,]|$)", text, re.M), f"{opt} missing"
        if isinstance(param, typer.core.TyperArgument):
            assert param.name.upper() in usage, usage
    assert "--help" in text
    assert _description(lines, width) == []
    assert _panels(lines, width) == []


def _rows(lines: list[str]) -> dict[str, list[str]]:
    """Option name -> the words after it on its first line."""
    words = [line.strip("│ ").removeprefix("* ").split() for line in lines if line.startswith("│")]
    return {w[0]: w[1:] for w in words if w and w[0].startswith("--")}


def test_flags_take_no_value_and_values_are_named() -> None:
    lines = _help(("caption",), 120)
    row = _rows(lines)
    assert row["--json"][0] == "One"  # nothing between a flag and its help
    assert row["--keep-prompt"][0] == "Print"
    assert row["--batch-size"][:2] == ["INTEGER", "[x>=1]"]
    assert row["--out"][0] == "PATH"
    assert row["--model"][0] == "TEXT"
    assert next(line for line in lines if "Usage:" in line).rstrip().endswith("caption [OPTIONS] INPUTS...")
    search = _rows(_help(("search",), 120))
    assert search["--rerank"][:2] == ["--no-rerank", "Re-rank"]
    assert search["--dedup"][0] == "FLOAT"
    assert _rows(_help(("eval", "caption"), 120))["--dataset"][0] == "[coco|nocaps]"


def test_metavars_and_rewrap() -> None:
    assert [metavar(x) for x in ("<int range>", "<str>", "<path>", "<float>", "<coco|nocaps>", "<list[str]>")] == [
        "INTEGER", "TEXT", "PATH", "FLOAT", "[coco|nocaps]", "TEXT"]
    text = """First line
    goes on.

    Second paragraph
    with `--flag` and [brackets].

    - a list
    - stays
    """
    assert rewrap(text) == "First line goes on.\n\nSecond paragraph with `--flag` and [brackets].\n\n- a list\n- stays"
