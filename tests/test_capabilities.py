"""The wrong model for a job is refused right after loading: one line, exit 2, nothing written (issue #10)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app

runner = CliRunner()


def _photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for n in range(2):
        Image.new("RGB", (24, 24), (60 * n, 90, 30)).save(folder / f"{n}.png")
    return folder


def _refused(result, needs: str) -> None:
    assert result.exit_code == 2, result.output
    assert needs in result.stderr and "Traceback" not in result.output and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1


def test_index_with_a_captioning_model(tiny_opt_dir: Path, tmp_path: Path) -> None:
    index = tmp_path / "idx"
    result = runner.invoke(app, ["index", str(_photos(tmp_path)), "--index", str(index), "--model", str(tiny_opt_dir),
                                 "--device", "cpu", "--json"])  # fmt: skip
    _refused(result, "image-text matching model")
    assert "Salesforce/blip2-itm-vit-g" in result.stderr
    assert not index.exists()  # no half-built index folder


def test_eval_retrieval_with_a_captioning_model(tiny_opt_dir: Path, tmp_path: Path) -> None:
    photos = _photos(tmp_path)
    ann = [{"image": f"{n}.png", "caption": ["a square"]} for n in range(2)]
    (tmp_path / "test.json").write_text(json.dumps(ann))
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "retrieval", "--annotations", str(tmp_path / "test.json"), "--model",
                                 str(tiny_opt_dir), "--images", str(photos), "--out", str(out), "--json"])  # fmt: skip
    _refused(result, "image-text matching model")
    assert not out.exists()


def test_ask_with_a_stage1_model(tiny_retrieval_model_dir: Path, tmp_path: Path) -> None:
    photos = _photos(tmp_path)
    result = runner.invoke(app, ["ask", str(photos / "0.png"), "what?", "--model", str(tiny_retrieval_model_dir)])
    _refused(result, "language model")
    assert "Salesforce/blip2-opt-2.7b" in result.stderr
    out = tmp_path / "answers.jsonl"
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": str(photos / "0.png"), "question": "what?"}) + "\n")
    result = runner.invoke(app, ["ask", "--batch", str(tmp_path / "q.jsonl"), "--out", str(out), "--model",
                                 str(tiny_retrieval_model_dir)])  # fmt: skip
    _refused(result, "language model")
    assert not out.exists()
