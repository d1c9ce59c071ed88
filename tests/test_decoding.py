"""blip2cli.decoding: the user's flags over the paper's settings, for every command (eval included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.config import GenerationOptions
from blip2cli.decoding import Decoding, check_template
from blip2cli.errors import UsageError

runner = CliRunner()


def test_flags_over_defaults() -> None:
    stage1 = GenerationOptions(num_beams=3, max_new_tokens=29, min_new_tokens=9)
    assert Decoding(max_new_tokens=5).apply(stage1).min_new_tokens == 5  # the default minimum is clamped
    assert Decoding(num_beams=2).apply(stage1).num_beams == 2
    sampled = Decoding(top_p=0.5).apply(stage1)
    assert (sampled.do_sample, sampled.num_beams, sampled.top_p) == (True, 1, 0.5)
    assert Decoding(num_captions=8).apply(stage1).num_beams == 8
    with pytest.raises(UsageError, match="--min-new-tokens"):
        Decoding(max_new_tokens=4, min_new_tokens=9).apply(stage1)  # what the user typed is never changed
    with pytest.raises(UsageError, match="--num-beams"):
        Decoding(sample=True, num_beams=3).check()


def test_templates() -> None:
    assert check_template("Q: {} A:") == "Q: {} A:"
    for bad in ("Q: A:", "Q: {} {x}"):
        with pytest.raises(UsageError, match="--template"):
            check_template(bad)


def test_eval_caption_with_a_stage1_model_and_a_short_maximum(tiny_retrieval_model_dir: Path, tmp_path: Path) -> None:
    """Was: "--min-new-tokens: expected 0..5, got 9", a flag the user never typed (eval built its own options)."""
    for n, shade in enumerate((40, 200)):
        Image.new("RGB", (24, 24), (shade, 90, 30)).save(tmp_path / f"{n}.png")
    anns = {"images": [{"id": n, "file_name": f"{n}.png"} for n in range(2)],
            "annotations": [{"image_id": n, "id": n, "caption": "a small square"} for n in range(2)]}  # fmt: skip
    (tmp_path / "anns.json").write_text(json.dumps(anns))
    args = ["eval", "caption", "--annotations", str(tmp_path / "anns.json"), "--model", str(tiny_retrieval_model_dir),
            "--images", str(tmp_path), "--device", "cpu", "--metrics", "Bleu", "--max-new-tokens", "5",
            "--out", str(tmp_path / "run"), "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n"] == 2
    settings = json.loads((tmp_path / "run" / "run.json").read_text())
    assert settings["options"]["max_new_tokens"] == 5 and settings["options"]["min_new_tokens"] == 5
