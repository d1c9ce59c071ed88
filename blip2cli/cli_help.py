"""How `--help` reads: click's classic names for values, flags without one, and docstrings wrapped to the terminal.

Typer (0.29) labels every value `<type>` (`<bool>` even for flags, which take none), writes required arguments
`{name}` in the usage line and, in rich mode, keeps a docstring's hard line breaks inside its paragraphs. The
command and group classes here give every parameter the metavar click would (`INTEGER`, `TEXT`, `PATH`,
`[coco|nocaps]`, none for a flag, `INPUTS...` for arguments) and join each paragraph's lines so rich wraps it
to the width of the terminal. Metavars set by hand (`N`, `KEY=VALUE`) are kept.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

_NAMES = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "path": "PATH", "file": "FILE", "directory": "DIR"}
_LIST_LINE = re.compile(r"\s*([-*+]|\d+[.)])\s")


def metavar(typer_label: str) -> str:
    """Typer's `<int range>`, `<str>`, `<list[path]>`, `<coco|nocaps>` -> click's `INTEGER`, `TEXT`, `PATH`,
    `[coco|nocaps]`."""
    label = typer_label.strip("<>").removesuffix(" range")
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]
    if "|" in label:
        return f"[{label}]"
    return _NAMES.get(label, label.upper())


def rewrap(text: str | None) -> str | None:
    """Join the lines of each paragraph (blank-line separated) into one, so the help wraps to the terminal.
    Paragraphs marked with click's \\b and lists (lines starting `- `, `* `, `1. `) keep their lines."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    joined = [p if p.startswith("\b") or _LIST_LINE.match(p) else " ".join(p.split()) for p in paragraphs]
    return "\n\n".join(joined)


class _Option(TyperOption):
    def display_type_rich(self, ctx: Any) -> str | None:
        if self.is_flag or self.count:
            return None  # --json, --rerank/--no-rerank: nothing follows a flag
        if self.metavar is not None:
            return self.metavar
        label = metavar(self.display_type(ctx))
        return label + "..." if self.nargs != 1 else label


class _Argument(TyperArgument):
    @property
    def display_name_raw(self) -> str:
        return (self.metavar or self.name or "").upper()

    def display_type_rich(self, ctx: Any) -> str | None:
        return None  # the name says it: INPUTS..., RECIPE

    def get_usage_pieces(self, ctx: Any) -> list[str]:
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return [name if self.required else f"[{name}]"]


def _tidy(params: list[Any]) -> list[Any]:
    """Typer builds its own parameter classes: give each the behaviour above (they add methods, no state)."""
    for param in params:
        if type(param) is TyperOption:
            param.__class__ = _Option
        elif type(param) is TyperArgument:
            param.__class__ = _Argument
    return params


class _ClickHelp:
    """Help that reads like click's (see the module docstring), for a Typer command or group."""

    help: str | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = rewrap(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _tidy(super().get_params(ctx))  # type: ignore[misc]


class HelpCommand(_ClickHelp, TyperCommand):
    """A command whose help reads like click's."""


class HelpGroup(_ClickHelp, TyperGroup):
    """A group of commands whose help reads like click's."""
