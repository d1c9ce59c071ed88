"""Feedback on stderr (issue 12): progress bars count images, questions or texts (not batches) and end with how
fast it went; every output file is named once it is written. stdout under --json stays JSON lines only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from tests.test_eval_cli import COLOURS, FakeBlip2
from tests.test_retrieval_cli import FakeModel
from tests.test_retrieval_store import make_images

runner = CliRunner()


def rate(verb: str, n: int, unit: str) -> re.Pattern[str]:
    """The line a finished bar leaves: "captioned 6 images in 0.4 s (15.2 images/s)"."""
    return re.compile(rf"^{verb} {n} {unit} in \d+\.\d s \([\d.e+-]+ {unit}/s\)$", re.MULTILINE)


def json_only(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 30), (40 * i, 20, 20)).save(folder / f"p{i}.png")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# caption and ask


def test_caption_counts_images_and_says_what_it_wrote(tiny_opt_dir: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "caps.jsonl"
    result = runner.invoke(app, ["caption", str(photos), "--model", str(tiny_opt_dir), "--device", "cpu",
                                 "--batch-size", "4", "--max-new-tokens", "3", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert len(json_only(result.stdout)) == 6
    assert "6/6 images" in result.stderr and "2/2" not in result.stderr  # images, not batches of 4
    assert rate("captioned", 6, "images").search(result.stderr), result.stderr
    assert f"wrote 6 records to {out}" in result.stderr


def test_ask_batch_counts_questions_and_says_what_it_wrote(tiny_opt_dir: Path, photos: Path, tmp_path) -> None:
    batch = tmp_path / "qs.jsonl"
    batch.write_text("".join(json.dumps({"image": str(p), "question": "what is it?"}) + "\n"
                             for p in sorted(photos.glob("*.png"))))  # fmt: skip
    out = tmp_path / "answers.jsonl"
    result = runner.invoke(app, ["ask", "--batch", str(batch), "--model", str(tiny_opt_dir), "--device", "cpu",
                                 "--batch-size", "4", "--max-new-tokens", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "6/6 questions" in result.stderr
    assert rate("answered", 6, "questions").search(result.stderr), result.stderr
    assert f"wrote 6 records to {out}" in result.stderr
    assert len(out.read_text().splitlines()) == 6


def test_one_question_has_no_bar_and_out_is_named(tiny_opt_dir: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "a.jsonl"
    result = runner.invoke(app, ["ask", str(photos / "p0.png"), "what?", "--model", str(tiny_opt_dir), "--device",
                                 "cpu", "--max-new-tokens", "3", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"wrote 1 record to {out}"  # a handful of work: no bar, no rate line


# ---------------------------------------------------------------------------------------------------------------
# eval (a fake model with the Blip2 inference API, as in test_eval_cli)


@pytest.fixture
def fake(monkeypatch, tmp_path: Path) -> FakeBlip2:
    model = FakeBlip2()
    monkeypatch.setattr("blip2cli.model.load.load_model", lambda *args, **kwargs: model)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (20, 12), rgb).save(tmp_path / f"{name}.png")
    return model


def test_eval_caption_counts_images_not_batches(fake, tmp_path: Path) -> None:
    names = list(COLOURS) * 2  # six benchmark images
    anns = {"images": [{"id": n, "file_name": f"{c}.png"} for n, c in enumerate(names)],
            "annotations": [{"image_id": n, "id": n, "caption": f"a {c} square"} for n, c in enumerate(names)]}
    (tmp_path / "anns.json").write_text(json.dumps(anns))
    out = tmp_path / "run"
    result = runner.invoke(app, ["eval", "caption", "--annotations", str(tmp_path / "anns.json"), "--model", "fake",
                                 "--images", str(tmp_path), "--metrics", "Bleu", "--batch-size", "2", "--out",
                                 str(out), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(json_only(result.stdout)) == 1
    assert "6/6 images" in result.stderr and "3/3" not in result.stderr
    assert rate("captioned", 6, "images").search(result.stderr), result.stderr
    assert f"wrote {out / 'scores.json'} and {out / 'predictions.json'}" in result.stderr
    rescored = runner.invoke(app, ["eval", "caption", "--annotations", str(tmp_path / "anns.json"), "--predictions",
                                   str(out / "predictions.json"), "--metrics", "Bleu", "--out", str(tmp_path / "re")])
    assert rescored.exit_code == 0, rescored.output
    assert f"wrote {tmp_path / 're' / 'scores.json'}\n" in rescored.stderr  # scoring a file writes no predictions


def test_eval_vqa_counts_questions(fake, tmp_path: Path) -> None:
    fake.llm = type("LLM", (), {"is_encoder_decoder": False})()
    ids = range(1, 7)
    anns = {"data_subtype": "val2014", "annotations": [
        {"question_id": q, "image_id": 1, "answers": [{"answer": "2"}] * 10, "answer_type": "number",
         "question_type": "how many"} for q in ids]}  # fmt: skip
    qs = {"data_subtype": "val2014", "questions": [{"question_id": q, "image_id": 1, "question": "How many?"}
                                                   for q in ids]}  # fmt: skip
    (tmp_path / "anns.json").write_text(json.dumps(anns))
    (tmp_path / "qs.json").write_text(json.dumps(qs))
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "COCO_val2014_000000000001.jpg")
    result = runner.invoke(app, ["eval", "vqa", "--annotations", str(tmp_path / "anns.json"), "--questions",
                                 str(tmp_path / "qs.json"), "--model", "fake", "--images", str(tmp_path),
                                 "--batch-size", "4"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "6/6 questions" in result.stderr and rate("answered", 6, "questions").search(result.stderr)


def test_eval_retrieval_counts_texts(fake, tmp_path: Path) -> None:
    ann = [{"image": f"{c}.png", "caption": [f"a {c} square", f"the {c} one"]} for c in COLOURS]
    (tmp_path / "test.json").write_text(json.dumps(ann))
    result = runner.invoke(app, ["eval", "retrieval", "--annotations", str(tmp_path / "test.json"), "--model", "fake",
                                 "--images", str(tmp_path), "--k-test", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "6/6 texts" in result.stderr and rate("embedded", 6, "texts").search(result.stderr)
    assert rate("re-ranked", 6, "texts").search(result.stderr)  # text -> image: one row per text


# ---------------------------------------------------------------------------------------------------------------
# index, capfilt, pretrain


def test_index_counts_images_and_names_the_export(monkeypatch, tmp_path: Path) -> None:
    from blip2cli.retrieval import indexer

    monkeypatch.setattr(indexer, "load_encoder", lambda name, *args, **kwargs: FakeModel(name))
    make_images(tmp_path / "photos", 12)
    export = tmp_path / "clip"
    result = runner.invoke(app, ["index", str(tmp_path / "photos"), "--index", str(tmp_path / "idx"), "--model",
                                 "fake", "--export", str(export), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json_only(result.stdout)[0]["added"] == 12
    assert "12/12 images" in result.stderr and rate("indexed", 12, "images").search(result.stderr)
    assert f"wrote {export}\n" in result.stderr and (export / "img_emb").is_dir()


def test_capfilt_says_what_it_wrote(tiny_opt_dir: Path, tiny_retrieval_model_dir: Path, photos: Path, tmp_path):
    out = tmp_path / "capfilt.jsonl"
    result = runner.invoke(app, ["capfilt", str(photos), "--out", str(out), "--captioner", str(tiny_opt_dir),
                                 "--scorer", str(tiny_retrieval_model_dir), "--device", "cpu", "--num-samples", "1",
                                 "--max-new-tokens", "3", "--min-new-tokens", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "6/6 images" in result.stderr and rate("captioned and ranked", 6, "images").search(result.stderr)
    assert f"wrote 6 records to {out}" in result.stderr
    assert len(out.read_text().splitlines()) == 6


def test_pretrain_says_what_it_saved(assets, tmp_path: Path, one_thread) -> None:
    from tests.training import RECIPE, sets_for

    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(RECIPE), "--stage", "1", "--out", str(out), "--json",
                                 *sets_for(assets, 2, **{"train.save_every": 1})])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json_only(result.stdout)[-1] == {"out": str(out), "step": 2}
    for folder in ("step-00000001", "step-00000002", "final"):
        assert f"saved {out / folder}\n" in result.stderr
    assert "2/2 steps" in result.stderr and rate("trained", 2, "steps").search(result.stderr)
