import json
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.config import ModelConfig
from tests.test_eval_caption import COCO_MINI, VAL, direct_scores, held_out

runner = CliRunner()
needs_coco = pytest.mark.skipif(not VAL.is_file(), reason=f"coco-mini not found at {COCO_MINI}")
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")


def one_json_line(result):
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


def write_caption_files(tmp_path, refs, preds):
    anns = {"images": [{"id": i, "file_name": f"{i}.png"} for i in refs],
            "annotations": [{"image_id": i, "id": n, "caption": c} for n, (i, c) in
                            enumerate((i, c) for i, caps in refs.items() for c in caps)]}  # fmt: skip
    (tmp_path / "anns.json").write_text(json.dumps(anns))
    (tmp_path / "preds.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in preds.items()]))
    return str(tmp_path / "anns.json"), str(tmp_path / "preds.json")


# ---------------------------------------------------------------------------------------------------------------
# Scoring files


@needs_coco
@needs_java
def test_eval_caption_predictions_json(tmp_path):
    refs, preds = held_out(10)
    anns, pred_file = write_caption_files(tmp_path, refs, preds)
    args = ["eval", "caption", "--annotations", anns, "--predictions", pred_file, "--metrics", "Bleu,ROUGE_L,CIDEr"]
    record = one_json_line(runner.invoke(app, [*args, "--json", "--out", str(tmp_path / "out")]))
    expected, _, _ = direct_scores(refs, preds)
    assert record["task"] == "caption" and record["n"] == 10
    assert record["metrics"] == pytest.approx(expected, rel=1e-12)
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == record
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and table.stdout == ""  # people's output goes to stderr
    assert "CIDEr" in table.stderr


def test_eval_caption_usage_errors(tmp_path):
    anns, preds = write_caption_files(tmp_path, {1: ["a dog"], 2: ["a cat"]}, {1: "a dog", 3: "a cat"})
    cases = [
        (["--annotations", anns], "--predictions FILE"),
        (["--annotations", anns, "--predictions", preds, "--model", "x"], "one of them"),
        (["--annotations", anns, "--model", "x"], "--images: required"),
        (["--annotations", anns, "--predictions", preds], "not in"),
        (["--annotations", preds, "--predictions", preds], "not a COCO caption file"),
        (["--annotations", anns, "--predictions", anns], "not a caption predictions file"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["eval", "caption", *args, "--json"])
        assert result.exit_code == 2, (args, result.output)
        assert result.stdout == ""
        assert message in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) <= 3  # one line, wrapped by the terminal width


def test_eval_vqa_predictions(tmp_path):
    anns = {"data_subtype": "val2014", "annotations": [
        {"question_id": 1, "image_id": 9, "answers": [{"answer": "2"}] * 3 + [{"answer": "3"}] * 7,
         "answer_type": "number", "question_type": "how many"},
        {"question_id": 2, "image_id": 9, "answers": [{"answer": "yes"}] * 10,
         "answer_type": "yes/no", "question_type": "is there"}]}  # fmt: skip
    (tmp_path / "anns.json").write_text(json.dumps(anns))
    (tmp_path / "preds.json").write_text(
        json.dumps([{"question_id": 1, "answer": "two"}, {"question_id": 2, "answer": "Yes"}])
    )
    args = ["eval", "vqa", "--annotations", str(tmp_path / "anns.json"), "--predictions", str(tmp_path / "preds.json")]
    record = one_json_line(runner.invoke(app, [*args, "--json"]))
    assert record == {"task": "vqa", "n": 2, "metrics": {"accuracy": 45.0, "number": 90.0, "yes/no": 0.0},
                      "question_types": {"how many": 90.0, "is there": 0.0}}  # fmt: skip
    lavis = one_json_line(runner.invoke(app, [*args, "--json", "--normalize", "lavis"]))
    assert lavis["metrics"]["yes/no"] == 100.0  # LAVIS lower-cases the prediction even when the answers agree
    (tmp_path / "preds.json").write_text(json.dumps([{"question_id": 1, "answer": "two"}]))
    missing = runner.invoke(app, [*args, "--json"])
    assert missing.exit_code == 2 and "no prediction for 1 of 2 questions" in missing.stderr


def test_eval_retrieval_rankings(tmp_path):
    ann = [{"image": f"{i}.png", "caption": [f"c{i}a", f"c{i}b"]} for i in range(3)]
    (tmp_path / "test.json").write_text(json.dumps(ann))
    rankings = {"i2t": [[0, 1], [0, 2], [5, 4]], "t2i": [[0], [1, 0], [1], [1], [0, 1], [2]]}
    (tmp_path / "r.json").write_text(json.dumps(rankings))
    args = [
        "eval",
        "retrieval",
        "--annotations",
        str(tmp_path / "test.json"),
        "--predictions",
        str(tmp_path / "r.json"),
    ]
    record = one_json_line(runner.invoke(app, [*args, "--json"]))
    assert (record["task"], record["n_images"], record["n_texts"]) == ("retrieval", 3, 6)
    m = record["metrics"]
    assert m["txt_r1"] == pytest.approx(200 / 3) and m["txt_r5"] == 100.0
    assert m["img_r1"] == pytest.approx(400 / 6) and m["img_r10"] == pytest.approx(500 / 6)  # text 4's image unranked


# ---------------------------------------------------------------------------------------------------------------
# Running a model (a fake one with the Blip2 inference API)

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class FakeBlip2:
    """Images are solid colours; the 'model' sees the dominant channel and names it."""

    def __init__(self):
        self.cfg = ModelConfig()
        self.cfg.vision.image_size = 16
        self.device = torch.device("cpu")
        self.llm = None  # captions like a stage-1 model (a Q-Former text head) and has ITC/ITM heads
        self.tokenizer = self.vision_proj = self.text_proj = self.itm_head = object()
        self.qformer = type("QFormer", (), {"cls": object()})()
        self.prompts = []
        self.text_lengths = []

    def _channel(self, pixels):
        return pixels.mean(dim=(2, 3)).argmax(dim=1)  # (B,)

    def generate(self, pixels, prompts, options):
        self.prompts += prompts
        names = list(COLOURS)
        return [
            [f"A {names[c]} square." if "Question" not in p else "Two"] for c, p in zip(self._channel(pixels), prompts)
        ]

    def vision_embeds(self, pixels):
        return self._channel(pixels).float()[:, None, None].expand(-1, 4, 8)  # (B, N, Dv)

    def image_features(self, embeds):
        onehot = torch.nn.functional.one_hot(embeds[:, 0, 0].long(), 256).float()
        return onehot[:, None, :].expand(-1, 32, -1)  # (B, 32, 256)

    def text_features(self, texts, max_len=None):
        self.text_lengths.append(max_len)
        return torch.nn.functional.one_hot(
            torch.tensor([list(COLOURS).index(t.split()[1]) for t in texts]), 256
        ).float()

    def itm_logits(self, embeds, texts, max_len=None):
        self.text_lengths.append(max_len)
        match = torch.tensor([float(list(COLOURS)[int(e[0, 0])] in t) for e, t in zip(embeds, texts)])
        return torch.stack([-match, match], dim=1)


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    model = FakeBlip2()
    monkeypatch.setattr("blip2cli.model.load.load_model",
                        lambda name, device="auto", dtype="auto", quantize="none", **hub: model)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (20, 12), rgb).save(tmp_path / f"{name}.png")
    return model


def caption_anns(tmp_path):
    anns = {"images": [{"id": n, "file_name": f"{c}.png"} for n, c in enumerate(COLOURS)],
            "annotations": [{"image_id": n, "id": n, "caption": f"a {c} square"} for n, c in enumerate(COLOURS)]}  # fmt: skip
    (tmp_path / "anns.json").write_text(json.dumps(anns))
    return str(tmp_path / "anns.json")


@needs_java
def test_eval_caption_runs_a_model_and_resumes(fake_model, tmp_path):
    out = tmp_path / "run"
    args = ["eval", "caption", "--annotations", caption_anns(tmp_path), "--model", "fake", "--images", str(tmp_path),
            "--metrics", "Bleu,CIDEr", "--out", str(out), "--batch-size", "2", "--json"]  # fmt: skip
    record = one_json_line(runner.invoke(app, args))
    assert record["metrics"]["Bleu_1"] == pytest.approx(1.0) and record["n"] == 3
    assert fake_model.prompts == ["a photo of"] * 3
    written = json.loads((out / "predictions.json").read_text())
    assert written == [{"image_id": n, "caption": f"A {c} square."} for n, c in enumerate(COLOURS)]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "scores.json").read_text()) == record

    fake_model.prompts.clear()
    assert one_json_line(runner.invoke(app, args)) == record
    assert fake_model.prompts == []  # everything came from predictions.jsonl
    rescored = runner.invoke(app, ["eval", "caption", "--annotations", caption_anns(tmp_path), "--predictions",
                                   str(out / "predictions.json"), "--metrics", "Bleu,CIDEr", "--json"])  # fmt: skip
    assert one_json_line(rescored)["metrics"] == record["metrics"]
    changed = runner.invoke(app, [*args, "--prompt", "a picture of"])
    assert changed.exit_code == 2 and "other settings" in changed.stderr


def test_eval_caption_missing_image(fake_model, tmp_path):
    (tmp_path / "red.png").unlink()
    args = ["eval", "caption", "--annotations", caption_anns(tmp_path), "--model", "fake", "--images", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "1 of 3 images are not under" in result.stderr


def test_eval_vqa_runs_a_model(fake_model, tmp_path):
    fake_model.llm = type("LLM", (), {"is_encoder_decoder": False})()  # answering needs a language model
    anns = {"data_subtype": "val2014", "annotations": [
        {"question_id": q, "image_id": 1, "answers": [{"answer": "2"}] * 10, "answer_type": "number",
         "question_type": "how many"} for q in (7, 8)]}  # fmt: skip
    qs = {"data_subtype": "val2014", "questions": [
        {"question_id": 7, "image_id": 1, "question": "How MANY dogs?"},
        {"question_id": 8, "image_id": 1, "question": "How many cats?"}]}  # fmt: skip
    (tmp_path / "anns.json").write_text(json.dumps(anns))
    (tmp_path / "qs.json").write_text(json.dumps(qs))
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "COCO_val2014_000000000001.jpg")
    out = tmp_path / "run"
    args = ["eval", "vqa", "--annotations", str(tmp_path / "anns.json"), "--questions", str(tmp_path / "qs.json"),
            "--model", "fake", "--images", str(tmp_path), "--out", str(out), "--json"]  # fmt: skip
    record = one_json_line(runner.invoke(app, args))
    assert record["metrics"] == {"accuracy": 100.0, "number": 100.0}  # "Two" is written normalised as "2"
    assert fake_model.prompts == ["Question: how many dogs? Short answer:", "Question: how many cats? Short answer:"]
    written = json.loads((out / "predictions.json").read_text())
    assert written == [{"question_id": 7, "answer": "2"}, {"question_id": 8, "answer": "2"}]
    assert json.loads((out / "predictions.jsonl").read_text().splitlines()[0])["raw_answer"] == "Two"


def test_eval_gqa_predictions(tmp_path):
    questions = {"201": {"imageId": "n1", "question": "Is it red?", "answer": "no"},
                 "202": {"imageId": "n1", "question": "Which side?", "answer": "left"}}  # fmt: skip
    (tmp_path / "gqa.json").write_text(json.dumps(questions))
    (tmp_path / "p.json").write_text(json.dumps([{"questionId": "201", "prediction": "No."},
                                                 {"questionId": "202", "prediction": "right"}]))  # fmt: skip
    args = ["eval", "vqa", "--dataset", "gqa", "--questions", str(tmp_path / "gqa.json"), "--predictions"]
    record = one_json_line(runner.invoke(app, [*args, str(tmp_path / "p.json"), "--json"]))
    assert record == {"task": "vqa", "n": 2, "metrics": {"accuracy": 50.0}}


def test_eval_retrieval_runs_a_model(fake_model, tmp_path):
    ann = [{"image": f"{c}.png", "caption": [f"a {c} square", f"the {c} one"]} for c in COLOURS]
    (tmp_path / "test.json").write_text(json.dumps(ann))
    out = tmp_path / "run"
    args = ["eval", "retrieval", "--annotations", str(tmp_path / "test.json"), "--model", "fake", "--images",
            str(tmp_path), "--k-test", "2", "--out", str(out), "--json"]  # fmt: skip
    record = one_json_line(runner.invoke(app, args))
    assert record["metrics"]["txt_r1"] == 100.0 and record["metrics"]["img_r1"] == 100.0
    assert set(fake_model.text_lengths) == {35}  # LAVIS's retrieval length, passed in
    assert fake_model.cfg.qformer.max_text_len == 32  # the loaded model is not changed
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["i2t"][0][:2] == [0, 1] and len(saved["i2t"][0]) == 6  # max(k, 10) capped by the 6 texts
    rescored = runner.invoke(app, ["eval", "retrieval", "--annotations", str(tmp_path / "test.json"),
                                   "--predictions", str(out / "predictions.json"), "--json"])  # fmt: skip
    assert one_json_line(rescored)["metrics"] == record["metrics"]


# ---------------------------------------------------------------------------------------------------------------
# The real Blip2 (tiny random checkpoints) end to end on real photos


def coco_subset(coco_mini, tmp_path, n=3):
    data = json.loads((coco_mini / "annotations" / "captions_val2017.json").read_text())
    ids = sorted({a["image_id"] for a in data["annotations"]})[:n]
    subset = {"images": [i for i in data["images"] if i["id"] in ids],
              "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}  # fmt: skip
    (tmp_path / "subset.json").write_text(json.dumps(subset))
    return str(tmp_path / "subset.json"), str(coco_mini / "val2017")


@needs_java
def test_eval_caption_with_a_tiny_model(tiny_opt_dir, coco_mini, tmp_path):
    anns, images = coco_subset(coco_mini, tmp_path)
    args = ["eval", "caption", "--annotations", anns, "--model", str(tiny_opt_dir), "--images", images,
            "--device", "cpu", "--metrics", "Bleu,CIDEr", "--max-new-tokens", "5", "--out", str(tmp_path / "o"), "--json"]  # fmt: skip
    record = one_json_line(runner.invoke(app, args))
    assert record["n"] == 3 and set(record["metrics"]) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    assert len(json.loads((tmp_path / "o" / "predictions.json").read_text())) == 3


def test_eval_retrieval_with_a_tiny_model(tiny_retrieval_model_dir, coco_mini, tmp_path):
    anns, images = coco_subset(coco_mini, tmp_path, n=4)
    args = ["eval", "retrieval", "--annotations", anns, "--model", str(tiny_retrieval_model_dir), "--images", images,
            "--device", "cpu", "--k-test", "3", "--json"]  # fmt: skip
    record = one_json_line(runner.invoke(app, args))
    assert (record["n_images"], record["n_texts"]) == (4, 20)
    assert all(0 <= v <= 100 for v in record["metrics"].values())
