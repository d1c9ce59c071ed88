"""Ill-formed benchmark files are refused naming the file, the record and the field: one line, exit 2 (issue 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app

runner = CliRunner()


def one_line(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def _vqa(tmp_path: Path, answers: object, **extra: object) -> list[str]:
    good = [{"answer": "cat", "answer_id": i + 1} for i in range(10)]
    anns = {"annotations": [{"question_id": 1, "image_id": 7, "answers": good, "answer_type": "other"},
                            {"question_id": 2, "image_id": 8, "answers": answers, "answer_type": "other", **extra}]}
    (tmp_path / "anns.json").write_text(json.dumps(anns))
    (tmp_path / "preds.json").write_text(json.dumps([{"question_id": 1, "answer": "cat"},
                                                     {"question_id": 2, "answer": "cat"}]))
    return ["eval", "vqa", "--annotations", str(tmp_path / "anns.json"), "--predictions", str(tmp_path / "preds.json")]


@pytest.mark.parametrize("answers,message", [
    ([], "annotations[1] (question_id 2): answers: expected a non-empty list of {answer} records, got list []"),
    ("cat", 'annotations[1] (question_id 2): answers: expected a non-empty list of {answer} records, got str "cat"'),
    ([{"answer": 5}], 'annotations[1] (question_id 2): answers[0]: expected {"answer": str}'),
    (["cat"] * 10, "answers[0]: expected"),
    (None, "answers: expected a non-empty list"),
])
def test_vqa_annotations_with_bad_answers(tmp_path: Path, answers: object, message: str) -> None:
    line = one_line(_vqa(tmp_path, answers))
    assert "anns.json" in line and message in line


def test_vqa_annotation_with_a_string_image_id(tmp_path: Path) -> None:
    good = [{"answer": "cat"}] * 10
    line = one_line(_vqa(tmp_path, good, image_id="eight"))
    assert "anns.json: annotations[1]: image_id: expected an integer" in line


def test_vqa_questions_that_are_not_strings(tmp_path: Path) -> None:
    args = _vqa(tmp_path, [{"answer": "cat"}] * 10)
    qs = {"questions": [{"question_id": 1, "image_id": 7, "question": "What?"},
                        {"question_id": 2, "image_id": 8, "question": 42}]}
    (tmp_path / "qs.json").write_text(json.dumps(qs))
    line = one_line([*args, "--questions", str(tmp_path / "qs.json")])
    assert "qs.json: questions[1] (question_id 2): question: expected a non-empty string, got int 42" in line


def test_gqa_answer_that_is_not_a_string(tmp_path: Path) -> None:
    (tmp_path / "gqa.json").write_text(json.dumps({"201": {"imageId": "n1", "question": "Red?", "answer": ["no"]}}))
    (tmp_path / "p.json").write_text(json.dumps([{"questionId": "201", "prediction": "no"}]))
    line = one_line(["eval", "vqa", "--dataset", "gqa", "--questions", str(tmp_path / "gqa.json"),
                     "--predictions", str(tmp_path / "p.json")])
    assert "gqa.json: question 201: answer: expected a string" in line


def _retrieval(tmp_path: Path, caption: object = "a cat", i2t: object = None, t2i: object = None) -> list[str]:
    anns = [{"image": "1.jpg", "caption": ["a dog", "a brown dog"]}, {"image": "2.jpg", "caption": caption}]
    (tmp_path / "test.json").write_text(json.dumps(anns))
    n_texts = 2 + (len(caption) if isinstance(caption, list) else 1)
    preds = {"i2t": i2t if i2t is not None else [[0, 1, 2], [2, 0, 1]],
             "t2i": t2i if t2i is not None else [[0, 1]] * n_texts}
    (tmp_path / "rankings.json").write_text(json.dumps(preds))
    return ["eval", "retrieval", "--annotations", str(tmp_path / "test.json"),
            "--predictions", str(tmp_path / "rankings.json")]


@pytest.mark.parametrize("caption,message", [
    (5, "record 1 (image '2.jpg'): caption: expected a string or a non-empty list of strings, got int 5"),
    (["a cat", 3], "record 1 (image '2.jpg'): caption: expected a string or a non-empty list of strings"),
    ([], "record 1 (image '2.jpg'): caption: expected"),
    ({"text": "a cat"}, "got dict"),
])
def test_retrieval_annotations_with_non_string_captions(tmp_path: Path, caption: object, message: str) -> None:
    line = one_line(_retrieval(tmp_path, caption=caption))
    assert "test.json" in line and message in line


@pytest.mark.parametrize("i2t,t2i,message", [
    ([[0, 1, 100], [2, 0, 1]], None, "i2t[0][2]: 100 is not one of the 3 text indices (an integer from 0 to 2)"),
    ([[0, 1, 2], [-5, 0, 1]], None, "i2t[1][0]: -5 is not one of the 3 text indices"),
    ([[0, 1, 2], ["2", 0, 1]], None, 'i2t[1][0]: "2" is not one of the 3 text indices'),
    ([[0, 1, 2], []], None, "i2t[1]: expected a non-empty list of text indices, got list []"),
    ([[0, 1, 2], "0 1 2"], None, "i2t[1]: expected a non-empty list of text indices, got str"),
    ([[0, 1, 2], [2, 0, 1]], [[0, 1], [1, 0], [0, 0]], "t2i[2]: the same image index appears more than once"),
    ([[0, 1, 2], [2, 0, 1]], [[0, 1], [1, 0], [2]],
     "t2i[2][0]: 2 is not one of the 2 image indices (an integer from 0 to 1)"),
    ([[0, 1, 2], [2, 0, 1.5]], None, "i2t[1][2]: 1.5 is not one of the 3 text indices"),
])
def test_retrieval_rankings_out_of_range_or_ill_typed(tmp_path: Path, i2t, t2i, message: str) -> None:
    line = one_line(_retrieval(tmp_path, i2t=i2t, t2i=t2i))
    assert "rankings.json" in line and message in line


def test_good_rankings_still_score(tmp_path: Path) -> None:
    result = runner.invoke(app, [*_retrieval(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metrics"]["txt_r1"] == 100.0
