import json
import shutil
from pathlib import Path

import pytest

from blip2cli.errors import UsageError
from blip2cli.eval import caption as cap
from blip2cli.eval import datasets as ds

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"
VAL = COCO_MINI / "annotations" / "captions_val2017.json"
needs_coco = pytest.mark.skipif(not VAL.is_file(), reason=f"coco-mini not found at {COCO_MINI}")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")


def held_out(n_images: int = 12):
    """Real COCO captions: the first caption of each image is the prediction, the other four the references."""
    data = ds.read_caption_annotations(VAL)
    ids = sorted(data.refs)[:n_images]
    return {i: data.refs[i][1:] for i in ids}, {i: data.refs[i][0] for i in ids}


def direct_scores(refs, preds, meteor=False):
    """pycocoevalcap's own tokenizer and scorers, run directly the way COCOEvalCap would."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in caps] for i, caps in refs.items()})
    res = tok.tokenize({i: [{"caption": preds[i]}] for i in refs})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"Bleu_{n + 1}": b for n, b in enumerate(bleu)}
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        out["METEOR"] = Meteor().compute_score(gts, res)[0]
    return out, gts, res


@needs_coco
@needs_java
def test_ptb_tokenize_matches_pycocoevalcap():
    refs, _ = held_out(20)
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    expected = PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in refs.items()})
    assert cap.ptb_tokenize(refs) == expected
    tricky = {1: ["Don't (run) now!", "", 'A dog\'s "toy"...\nbig']}
    assert cap.ptb_tokenize(tricky) == PTBTokenizer().tokenize({1: [{"caption": c} for c in tricky[1]]})


@needs_coco
@needs_java
def test_scores_equal_pycocoevalcap_scorers():
    refs, preds = held_out(12)
    scores = cap.score_captions(refs, preds, metrics=cap.FAST_METRICS)
    expected, _, _ = direct_scores(refs, preds)
    assert scores.metrics == pytest.approx(expected, rel=1e-12)
    assert set(scores.metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert scores.n == 12 and scores.official
    assert 0.3 < scores.metrics["CIDEr"] < 3  # a human caption against four others: CIDEr ~ 0.8-1.2


@needs_coco
@needs_java
def test_per_domain_cider_uses_each_domains_images():
    refs, preds = held_out(10)
    ids = list(refs)
    domains = {i: ("in-domain" if n < 5 else "out-domain") for n, i in enumerate(ids)}
    scores = cap.score_captions(refs, preds, metrics=["CIDEr"], domains=domains)
    for name in ("in-domain", "out-domain"):
        subset = [i for i in ids if domains[i] == name]
        expected, _, _ = direct_scores({i: refs[i] for i in subset}, {i: preds[i] for i in subset})
        assert scores.domains[name]["CIDEr"] == pytest.approx(expected["CIDEr"], rel=1e-12)


@needs_coco
def test_without_java_fallback_is_labelled(monkeypatch):
    refs, preds = held_out(5)
    monkeypatch.setattr(cap, "java_problem", lambda: "Java was not found on PATH")
    scores = cap.score_captions(refs, preds)  # METEOR and SPICE requested but dropped: no JVM starts
    assert not scores.official
    assert "METEOR" not in scores.metrics and "SPICE" not in scores.metrics
    assert "CIDEr" in scores.metrics
    assert any("NOT official" in w and "Java" in w for w in scores.warnings)


def test_fallback_tokenizer():
    assert cap.fallback_tokenize({1: ["A dog's toy, on the grass."]}) == {1: ["a dog 's toy on the grass"]}


def test_spice_without_corenlp_is_skipped_with_where_to_put_the_jars(monkeypatch, tmp_path):
    monkeypatch.setattr(cap, "_package_dir", lambda sub: tmp_path / sub)
    message = cap.spice_problem()
    assert "stanford-corenlp-3.6.0.jar" in message and str(tmp_path / "spice" / "lib") in message
    (tmp_path / "spice" / "lib").mkdir(parents=True)
    for jar in cap.CORENLP_JARS:
        (tmp_path / "spice" / "lib" / jar).write_bytes(b"")
    assert cap.spice_problem() is None


def test_unknown_metric():
    with pytest.raises(UsageError, match="unknown BLEU"):
        cap.score_captions({1: ["a"]}, {1: "a"}, metrics=["BLEU"])


# ---------------------------------------------------------------------------------------------------------------
# Readers


@needs_coco
def test_read_coco_captions():
    data = ds.read_caption_annotations(VAL)
    assert len(data.refs) == 79 and all(len(c) == 5 for c in data.refs.values())
    assert data.files[397133][0] == "000000397133.jpg"
    assert data.domains == {}


def test_read_nocaps_domains_and_karpathy_list(tmp_path):
    nocaps = {"images": [{"id": 0, "file_name": "a.jpg", "domain": "in-domain"},
                         {"id": 1, "file_name": "b.jpg", "domain": "out-domain"}],
              "annotations": [{"image_id": 0, "id": 1, "caption": "x"}, {"image_id": 1, "id": 2, "caption": "y"}]}  # fmt: skip
    (tmp_path / "nocaps.json").write_text(json.dumps(nocaps))
    assert ds.read_caption_annotations(tmp_path / "nocaps.json").domains == {0: "in-domain", 1: "out-domain"}
    karpathy = [{"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["a man", "a person"]}]
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    data = ds.read_caption_annotations(tmp_path / "k.json")
    assert data.refs == {391895: ["a man", "a person"]}
    assert data.files[391895] == ["val2014/COCO_val2014_000000391895.jpg"]


def test_caption_reader_errors(tmp_path):
    path = tmp_path / "f.json"
    path.write_text(
        json.dumps({"images": [], "annotations": [{"image_id": 1, "bbox": [0, 0, 1, 1], "category_id": 3}]})
    )
    with pytest.raises(UsageError, match="not a COCO caption file.*instances file"):
        ds.read_caption_annotations(path)
    path.write_text(json.dumps([{"image_id": 1, "answer": "x", "question_id": 1}]))
    with pytest.raises(UsageError, match="not a caption predictions file"):
        ds.read_caption_predictions(path)
    path.write_text(json.dumps([{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}]))
    with pytest.raises(UsageError, match="image_id 1 has more than one caption"):
        ds.read_caption_predictions(path)
    with pytest.raises(UsageError, match="for images not in"):
        ds.check_same_ids({1, 2, 9}, {1, 2, 3}, Path("p.json"), Path("a.json"), "image")
    with pytest.raises(UsageError, match="no prediction for 1 of 3 images"):
        ds.check_same_ids({1, 2}, {1, 2, 3}, Path("p.json"), Path("a.json"), "image")


@pytest.mark.slow
@needs_coco
@needs_java
def test_meteor_equals_pycocoevalcap():
    refs, preds = held_out(8)
    scores = cap.score_captions(refs, preds, metrics=["METEOR"])
    expected, _, _ = direct_scores(refs, preds, meteor=True)
    assert scores.metrics["METEOR"] == pytest.approx(expected["METEOR"], rel=1e-9)
