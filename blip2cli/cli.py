"""The `blip2` command line. Commands parse, load, call one library function and render.

Heavy libraries (torch, transformers, faiss) are imported inside command bodies so `blip2 --help` stays fast.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any

import typer

from blip2cli import __version__
from blip2cli.errors import UsageError

app = typer.Typer(
    name="blip2",
    help="BLIP-2 from the terminal: caption, ask, index, search, pretrain, finetune and evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Score a model (or a predictions file) on the paper's benchmarks.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

def command(parent: typer.Typer, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose UsageError becomes one red line and exit code 2 (also under CliRunner)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except UsageError as exc:
                from blip2cli.render import error

                error(str(exc))
                raise typer.Exit(exc.exit_code) from None

        parent.command(name)(wrapper)
        return fn

    return register


JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout (NDJSON).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"blip2cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """BLIP-2 from the terminal."""


def _not_built(command: str) -> None:
    raise UsageError(f"`blip2 {command}` is not built yet in this version")


@command(app)
def env(json_out: JsonOpt = False) -> None:
    """Print versions of the project, Python, torch, transformers, faiss, CUDA, devices and Java."""
    from blip2cli import env as env_mod
    from blip2cli.render import emit, table

    info = env_mod.collect()
    if json_out:
        emit(info)
    else:
        table("blip2 env", ["what", "value"], [(k, v) for k, v in info.items()])


@command(app)
def caption() -> None:
    """Caption images (files, folders, globs)."""
    _not_built("caption")


@command(app)
def ask() -> None:
    """Ask a question about an image (zero-shot VQA), give an instruction, or chat."""
    _not_built("ask")


@command(app)
def index() -> None:
    """Embed images into a FAISS index for search."""
    _not_built("index")


@command(app)
def search() -> None:
    """Search an index by text or by image."""
    _not_built("search")


@command(app)
def pretrain() -> None:
    """Pretrain the Q-Former: stage 1 (ITC+ITM+ITG) or stage 2 (LM loss through a frozen LLM)."""
    _not_built("pretrain")


@command(app)
def finetune() -> None:
    """Fine-tune for captioning, retrieval or VQA."""
    _not_built("finetune")


@command(eval_app, "caption")
def eval_caption() -> None:
    """COCO / NoCaps caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SPICE)."""
    _not_built("eval caption")


@command(eval_app, "vqa")
def eval_vqa() -> None:
    """VQAv2 / OK-VQA / GQA accuracy."""
    _not_built("eval vqa")


@command(eval_app, "retrieval")
def eval_retrieval() -> None:
    """COCO 5k / Flickr30K 1k image-text retrieval recall."""
    _not_built("eval retrieval")


def main() -> None:
    """Console-script entry point."""
    app()
