import json

import pytest

from blip2cli.errors import UsageError
from blip2cli.eval import datasets as ds
from blip2cli.eval import vqa
from blip2cli.eval.vqa import normalize_answer, process_punctuation, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("black-and-white", "black and white"),
        ("a man's hat", "man's hat"),
        ("No!", "no"),
        ("  The\tcat\n", "cat"),  # tabs/newlines become spaces, then strip
        ("none", "0"),
        ("ten", "10"),
        ("An apple", "apple"),
        ("dont know", "don't know"),  # contraction restored
        ("Im", "im"),  # the table's capitalised keys never match lower-cased text
        ("somebody'd", "somebodyd"),  # an odd entry kept as is
        ("yes , no", "yes no"),  # a mark next to a space is deleted, not spaced
        ("10,000 cats, dogs", "10000 cats dogs"),  # digit-comma-digit anywhere: every mark is deleted
        ("cat,dog", "cat dog"),  # otherwise replaced by a space
        ("(red)", "red"),
        ("#1 $5 50% a&b 2*3 12:30", "#1 $5 50% a&b 2*3 12:30"),  # these marks survive
    ],
)
def test_normalisation_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_period_quirks():
    assert process_punctuation("3.5") == "3.5"  # a period followed by a digit stays
    assert process_punctuation("a.5") == "a.5"  # the "not preceded by a digit" guard never applies: only "followed"
    assert process_punctuation("5.") == "5"
    assert process_punctuation("." * 40) == "." * 8  # at most 32 periods are removed


def _ten(answer_counts):
    answers = [a for a, n in answer_counts for _ in range(n)]
    assert len(answers) == 10
    return answers


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out(matches, expected):
    # k matches among ten: k held-out subsets see k-1 matches, 10-k see k -> (k*min(3,k-1) + (10-k)*min(3,k)) / 30
    answers = _ten([("cat", matches), ("dog", 10 - matches)]) if matches < 10 else ["cat"] * 10
    assert vqa_accuracy("cat", answers) == expected


def test_unanimous_answers_are_not_normalised():
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    # with disagreement everything is normalised
    assert vqa_accuracy("Two", _ten([("2", 4), ("3", 6)])) == 1.0


def test_lavis_mode_normalises_the_prediction_always_and_answers_by_punctuation_only():
    assert vqa_accuracy("Yes", ["yes"] * 10, mode="lavis") == 1.0
    assert vqa_accuracy("two", ["2"] * 10, mode="lavis") == 1.0
    # answers keep their articles/number words in LAVIS mode: "the dog" never equals the normalised "dog"
    answers = _ten([("the dog", 5), ("dog", 5)])
    assert vqa_accuracy("The dog", answers, mode="official") == 1.0
    assert vqa_accuracy("The dog", answers, mode="lavis") == 1.0  # 5 plain "dog" match "dog"
    assert vqa_accuracy("the dog", _ten([("the dog", 9), ("a dog", 1)]), mode="lavis") == 0.0


def test_score_vqa_per_type():
    answers = {1: ["yes"] * 10, 2: _ten([("2", 3), ("3", 7)]), 3: _ten([("red", 1), ("blue", 9)])}
    preds = {1: "yes", 2: "two", 3: "red"}
    scores = vqa.score_vqa(
        answers, preds, {1: "yes/no", 2: "number", 3: "other"}, {1: "is the", 2: "how many", 3: "what"}
    )
    assert scores.n == 3
    assert scores.accuracy == round(100 * (1.0 + 0.9 + 0.3) / 3, 2) == 73.33
    assert list(scores.metrics().items()) == [("accuracy", 73.33), ("yes/no", 100.0), ("number", 90.0), ("other", 30.0)]
    assert scores.question_types == {"how many": 90.0, "is the": 100.0, "what": 30.0}


def test_gqa_exact_match_after_normalising_the_prediction():
    scores = vqa.score_gqa({"a": "no", "b": "2", "c": "left"}, {"a": "No.", "b": "two", "c": "the right"})
    assert scores.accuracy == round(100 * 2 / 3, 2)


@pytest.mark.skipif(not vqa.lemmatizer_available(), reason="lemminflect not installed (pip install 'blip2cli[okvqa]')")
def test_lemmatize():
    assert vqa.lemmatize("dogs") == "dog"
    assert vqa.lemmatize("skiing") == "ski"
    assert vqa.lemmatize("two children") == "two child"


# ---------------------------------------------------------------------------------------------------------------
# Readers


def write_vqa(tmp_path, answers_by_qid):
    anns = {"data_subtype": "val2014", "annotations": [
        {"question_id": qid, "image_id": 100 + qid, "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(ans)],
         "answer_type": "other", "question_type": "what is"} for qid, ans in answers_by_qid.items()]}  # fmt: skip
    qs = {"data_subtype": "val2014", "questions": [
        {"question_id": qid, "image_id": 100 + qid, "question": f"What is {qid}?"} for qid in answers_by_qid]}  # fmt: skip
    (tmp_path / "anns.json").write_text(json.dumps(anns))
    (tmp_path / "qs.json").write_text(json.dumps(qs))
    return tmp_path / "anns.json", tmp_path / "qs.json"


def test_read_vqa(tmp_path):
    anns, qs = write_vqa(tmp_path, {1: ["cat"] * 10, 2: ["dog"] * 10})
    items = ds.read_vqa(anns, qs)
    assert [(i.question_id, i.question, i.answers[0]) for i in items] == [
        (1, "What is 1?", "cat"),
        (2, "What is 2?", "dog"),
    ]
    assert items[0].images[0] == "val2014/COCO_val2014_000000000101.jpg"


def test_reader_errors(tmp_path):
    anns, qs = write_vqa(tmp_path, {1: ["cat"] * 10})
    with pytest.raises(UsageError, match="not a VQA annotation file.*VQA question file"):
        ds.read_vqa(qs, None)
    with pytest.raises(UsageError, match="not a VQA question file"):
        ds.read_vqa(anns, anns)
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(UsageError, match="not valid JSON"):
        ds.read_vqa(bad, None)
    with pytest.raises(UsageError, match="no such file"):
        ds.read_vqa(tmp_path / "missing.json", None)
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"image_id": 1, "caption": "x"}]))
    with pytest.raises(UsageError, match="not a VQA predictions file.*caption predictions"):
        ds.read_vqa_predictions(preds, "vqav2")


def test_read_gqa(tmp_path):
    path = tmp_path / "gqa.json"
    path.write_text(json.dumps({"201": {"imageId": "n123", "question": "Is it red?", "answer": "no"}}))
    (item,) = ds.read_gqa(path)
    assert (item.question_id, item.answers, item.images[0]) == ("201", ["no"], "n123.jpg")
    preds = tmp_path / "p.json"
    preds.write_text(json.dumps([{"questionId": 201, "prediction": "no"}]))
    assert ds.read_vqa_predictions(preds, "gqa") == {"201": "no"}
