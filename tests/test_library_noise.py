"""Library noise stays out of `blip2 ask` and `blip2 caption` (issue 12): no transformers warning ("generation
flags are not valid", deprecated arguments) for greedy, sampled or beam decoding, on OPT or Flan-T5."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app

runner = CliRunner()

DECODING = {"greedy": ["--num-beams", "1"], "sampled": ["--sample", "--seed", "0"], "beam": ["--num-beams", "3"]}


@pytest.fixture
def library_logs():
    """Log records of WARNING and above from transformers (whose logger does not propagate) and the rest; its
    "warning_once" memory is cleared, so a warning an earlier test triggered shows again here."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("noise") / "x.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("how", list(DECODING))
@pytest.mark.parametrize("llm", ["tiny_opt_dir", "tiny_t5_dir"])
@pytest.mark.parametrize("command", ["ask", "caption"])
def test_no_library_warnings(command, llm, how, request, photo, library_logs) -> None:
    model = request.getfixturevalue(llm)
    text = [str(photo), "what is it?"] if command == "ask" else [str(photo)]
    result = runner.invoke(app, [command, *text, "--model", str(model), "--device", "cpu", "--max-new-tokens", "4",
                                 *DECODING[how]])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()  # it did answer / caption
    assert "warning" not in result.stderr.lower() and "deprecated" not in result.stderr, result.stderr
    assert [r.getMessage() for r in library_logs] == []
