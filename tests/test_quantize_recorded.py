"""Issue 15: what runs and indexes record of --quantize. A resumable --out run records it, and a rerun with another
quantization is refused in one line before the model loads (its records would mix predictions of different
weights); runs written before quantize was recorded were unquantized, so they resume with --quantize none.
`blip2 search` without --quantize uses the index's quantization; another one is refused."""

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


@needs_torchao
def test_search_defaults_to_the_index_quantization(tiny_retrieval_model_dir, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for colour in ("red", "blue", "green"):
        Image.new("RGB", (30, 30), colour).save(photos / f"{colour}.png")
    model = ["--model", str(tiny_retrieval_model_dir), "--device", "cpu"]
    for name, quantize in (("int8", ["--quantize", "int8"]), ("plain", [])):
        built = runner.invoke(app, ["index", str(photos), "--index", str(tmp_path / name), *model, *quantize])
        assert built.exit_code == 0, built.output
    search = ["search", "a red square", "--no-rerank", "--device", "cpu", "--json", "--index"]

    found = runner.invoke(app, [*search, str(tmp_path / "int8")])
    assert found.exit_code == 0, found.output
    assert len([json.loads(line) for line in found.stdout.splitlines()]) == 3
    assert "--quantize int8: the index was built with it" in found.stderr
    plain = runner.invoke(app, [*search, str(tmp_path / "plain")])
    assert plain.exit_code == 0 and "--quantize" not in plain.stderr  # nothing to say for an unquantized index

    loads = []
    monkeypatch.setattr("blip2cli.retrieval.indexer.load_encoder", lambda *a: loads.append(a))
    for index, other, built in (("int8", "none", "int8"), ("plain", "int8", "none")):
        refused = runner.invoke(app, [*search, str(tmp_path / index), "--quantize", other])
        assert refused.exit_code == 2 and "Traceback" not in refused.output
        assert refused.stderr.strip().splitlines() == [
            f"error: {tmp_path / index} was built with --quantize {built}, not {other}: vectors of differently "
            f"quantized weights are not mixed; use --quantize {built}, or another --index folder"]
    bad = runner.invoke(app, [*search, str(tmp_path / "plain"), "--quantize", "int9"])
    assert bad.exit_code == 2 and "expected none, int8 or int4" in bad.stderr
    assert loads == []  # every refusal came before a model load
