"""Issue 15: a resumable --out run records --quantize, and a rerun with another quantization is refused in one
line before the model loads (its records would mix predictions of different weights). Runs written before
quantize was recorded were unquantized: they resume with --quantize none."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from tests import test_eval_cli
from tests.test_eval_cli import COLOURS, caption_anns
from tests.test_quantize import needs_torchao

runner = CliRunner()
fake_model = test_eval_cli.fake_model  # the fixture: a fake Blip2 that names colours


def _eval_args(kind: str, tmp_path) -> list[str]:
    images = ["--model", "fake", "--images", str(tmp_path), "--out", str(tmp_path / "run"), "--json"]
    if kind == "caption":
        return ["eval", "caption", "--annotations", caption_anns(tmp_path), "--metrics", "Bleu", *images]
    if kind == "retrieval":
        ann = [{"image": f"{c}.png", "caption": [f"a {c} square"]} for c in COLOURS]
        (tmp_path / "test.json").write_text(json.dumps(ann))
        return ["eval", "retrieval", "--annotations", str(tmp_path / "test.json"), "--k-test", "2", *images]
    anns = {"data_subtype": "val2014", "annotations": [{"question_id": 7, "image_id": 1, "answers": [
        {"answer": "2"}] * 10, "answer_type": "number", "question_type": "how many"}]}  # fmt: skip
    qs = {"data_subtype": "val2014", "questions": [{"question_id": 7, "image_id": 1, "question": "How many?"}]}
    (tmp_path / "anns.json").write_text(json.dumps(anns))
    (tmp_path / "qs.json").write_text(json.dumps(qs))
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "COCO_val2014_000000000001.jpg")
    return ["eval", "vqa", "--annotations", str(tmp_path / "anns.json"), "--questions", str(tmp_path / "qs.json"),
            *images]


@pytest.mark.parametrize("kind", ["caption", "vqa", "retrieval"])
@pytest.mark.parametrize("first, then", [("int8", "none"), ("none", "int8")])
def test_eval_resume_refuses_another_quantization(kind, first, then, fake_model, tmp_path, monkeypatch):
    if kind == "vqa":
        fake_model.llm = type("LLM", (), {"is_encoder_decoder": False})()
    args = _eval_args(kind, tmp_path)
    done = runner.invoke(app, [*args, "--quantize", first])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "run" / "run.json").read_text())["quantize"] == first
    loads = []
    monkeypatch.setattr("blip2cli.model.load.load_model", lambda *a, **k: loads.append(a) or fake_model)
    mixed = runner.invoke(app, [*args, "--quantize", then])
    assert mixed.exit_code == 2, mixed.output
    assert f'other settings (quantize: "{first}" there, "{then}" now)' in mixed.stderr
    assert len(mixed.stderr.strip().splitlines()) == 1 and "Traceback" not in mixed.output
    assert loads == []  # refused before the model loads
    again = runner.invoke(app, [*args, "--quantize", first])
    assert again.exit_code == 0 and len(loads) == 1  # the same quantization resumes


def test_a_run_from_before_quantize_was_recorded_resumes_unquantized(fake_model, tmp_path):
    args = _eval_args("caption", tmp_path)
    assert runner.invoke(app, args).exit_code == 0
    run = tmp_path / "run" / "run.json"
    settings = json.loads(run.read_text())
    del settings["quantize"]  # as an older version wrote it
    run.write_text(json.dumps(settings))
    assert runner.invoke(app, args).exit_code == 0
    mixed = runner.invoke(app, [*args, "--quantize", "int8"])
    assert mixed.exit_code == 2 and 'quantize: "none" there, "int8" now' in mixed.stderr


@needs_torchao
def test_eval_vqa_with_a_tiny_int8_model_resumes_only_as_int8(tiny_opt_dir, tmp_path):
    """The real path: a tiny OPT BLIP-2 loaded in int8 answers, and its --out run only resumes as int8."""
    args = _eval_args("vqa", tmp_path)
    args[args.index("fake")] = str(tiny_opt_dir)
    args += ["--device", "cpu", "--max-new-tokens", "3"]
    first = runner.invoke(app, [*args, "--quantize", "int8"])
    assert first.exit_code == 0, first.output
    predictions = (tmp_path / "run" / "predictions.jsonl").read_text()
    mixed = runner.invoke(app, args)
    assert mixed.exit_code == 2 and '(quantize: "int8" there, "none" now)' in mixed.stderr
    resumed = runner.invoke(app, [*args, "--quantize", "int8"])
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "run" / "predictions.jsonl").read_text() == predictions  # nothing redone, nothing mixed


@needs_torchao
def test_caption_out_records_quantize(tiny_opt_dir, tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    args = ["caption", str(tmp_path / "red.png"), "--model", str(tiny_opt_dir), "--device", "cpu",
            "--max-new-tokens", "3", "--out", str(tmp_path / "captions.jsonl")]
    assert runner.invoke(app, [*args, "--quantize", "int8"]).exit_code == 0
    assert json.loads((tmp_path / "captions.settings.json").read_text())["quantize"] == "int8"
    mixed = runner.invoke(app, args)
    assert mixed.exit_code == 2 and '(quantize: "int8" there, "none" now)' in mixed.stderr
