"""The command line as fastapi-cli tests its own: each command is invoked with CliRunner, its one library call is
patched, and the exact arguments it receives are asserted (how `pretrain` is tested without training). The
end-to-end runs live beside the modules they exercise (test_caption_cli.py, test_eval_cli.py, ...)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.decoding import Decoding

runner = CliRunner()
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"
MODEL = object()  # what the patched load_model returns


class Recorder:
    """Stands in for a job function: keeps its arguments, returns `result`."""

    def __init__(self, result: Any) -> None:
        self.result, self.calls = result, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.result

    @property
    def kwargs(self) -> dict[str, Any]:
        assert len(self.calls) == 1, self.calls
        return self.calls[0][1]


@pytest.fixture
def loaded(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    calls: list[tuple] = []
    monkeypatch.setattr("blip2cli.model.load.load_model",
                        lambda *a, quantize="none", revision=None, cache_dir=None:
                        calls.append((*a, quantize, revision, cache_dir)) or MODEL)
    monkeypatch.setattr("blip2cli.model.capabilities.require", lambda *a: None)
    return calls


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "red.png")
    return tmp_path / "red.png"


def invoke(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_caption(monkeypatch, loaded, photo: Path, tmp_path: Path) -> None:
    job = Recorder(iter([{"image": str(photo), "caption": "a red square"}]))
    monkeypatch.setattr("blip2cli.caption.caption_images", job)
    out = tmp_path / "caps.jsonl"
    result = invoke("caption", str(photo), "--model", "m", "--prompt", "a photo of", "--num-beams", "2",
                    "--max-new-tokens", "9", "--batch-size", "3", "--device", "cpu", "--out", str(out), "--json",
                    "--revision", "r1", "--cache-dir", "hf")  # fmt: skip
    assert loaded == [("m", "cpu", "auto", "none", "r1", Path("hf"))]
    assert job.calls[0][0] == (MODEL, [str(photo)])  # inputs are strings: files, "-" or URLs
    log = job.kwargs.pop("log")
    assert job.kwargs == {"decoding": Decoding(num_beams=2, max_new_tokens=9), "prompt": "a photo of",
                          "keep_prompt": False, "batch_size": 3}  # fmt: skip
    assert log.path == out and log.settings["model"] == "m" and log.settings["revision"] == "r1"
    assert json.loads(result.stdout) == {"image": str(photo), "caption": "a red square"}


def test_ask(monkeypatch, loaded, photo: Path) -> None:
    job = Recorder(iter([{"image": str(photo), "question": "what?", "answer": "red"}]))
    monkeypatch.setattr("blip2cli.ask.answer", job)
    result = invoke("ask", str(photo), "What?", "--model", "m", "--top-p", "0.5", "--template", "Q: {} A:")
    from blip2cli.ask import BatchQuestion

    assert job.calls[0][0] == (MODEL, [BatchQuestion(0, str(photo), "What?")])
    assert job.kwargs == {"decoding": Decoding(top_p=0.5), "template": "Q: {} A:", "instruct": False,
                          "batch_size": 1, "log": None}  # fmt: skip
    assert result.stdout == "red\n"  # the answer alone on stdout


def test_eval_commands(monkeypatch, tmp_path: Path) -> None:
    record = {"task": "caption", "n": 1, "metrics": {"CIDEr": 1.0}}
    job = Recorder(record)
    monkeypatch.setattr("blip2cli.eval.caption.eval_caption", job)
    result = invoke("eval", "caption", "--annotations", "a.json", "--model", "m", "--images", "imgs",
                    "--metrics", "Bleu, CIDEr", "--max-new-tokens", "5", "--out", "o", "--json", "--revision", "r1",
                    "--cache-dir", "hf")  # fmt: skip
    assert job.kwargs == {"annotations": Path("a.json"), "predictions": None, "model": "m", "images": Path("imgs"),
                          "dataset": "coco", "metrics": ["Bleu", "CIDEr"], "prompt": "a photo of",
                          "decoding": Decoding(max_new_tokens=5), "device": "auto", "dtype": "auto",
                          "quantize": "none", "batch_size": 16, "out": Path("o"), "revision": "r1",
                          "cache_dir": Path("hf")}  # fmt: skip
    assert json.loads(result.stdout) == record

    job = Recorder({"task": "vqa", "n": 1, "metrics": {"accuracy": 50.0}})
    monkeypatch.setattr("blip2cli.eval.vqa.eval_vqa", job)
    invoke("eval", "vqa", "--predictions", "p.json", "--questions", "q.json", "--dataset", "okvqa", "--lemmatize")
    assert job.kwargs == {"annotations": None, "questions": Path("q.json"), "predictions": Path("p.json"),
                          "model": None, "images": None, "dataset": "okvqa", "normalize": "official",
                          "lemmatize_predictions": True, "template": "Question: {} Short answer:",
                          "decoding": Decoding(), "device": "auto", "dtype": "auto", "quantize": "none",
                          "batch_size": 16, "out": None, "revision": None, "cache_dir": None}  # fmt: skip

    job = Recorder({"task": "retrieval", "n_images": 1, "n_texts": 1, "metrics": {"r_mean": 1.0}})
    monkeypatch.setattr("blip2cli.eval.retrieval.eval_retrieval", job)
    invoke("eval", "retrieval", "--annotations", "t.json", "--model", "m", "--images", "i", "--k-test", "4",
           "--quantize", "int8")
    assert job.kwargs == {"annotations": Path("t.json"), "predictions": None, "model": "m", "images": Path("i"),
                          "dataset": "coco", "k_test": 4, "max_text_len": 35, "device": "auto", "dtype": "auto",
                          "quantize": "int8", "batch_size": 16, "out": None, "revision": None,
                          "cache_dir": None}  # fmt: skip


def test_index_and_search(monkeypatch, photo: Path, tmp_path: Path) -> None:
    from blip2cli.retrieval.indexer import IndexReport

    job = Recorder(IndexReport(str(tmp_path / "idx")))
    monkeypatch.setattr("blip2cli.retrieval.indexer.index_images", job)
    invoke("index", str(photo), "--index", str(tmp_path / "idx"), "--workers", "2", "--index-key", "Flat", "--json")
    (paths, index_dir, _loader), kwargs = job.calls[0]
    assert (paths, index_dir) == ([photo], tmp_path / "idx")
    assert {k: v for k, v in kwargs.items() if k != "progress"} == {
        "model": None, "batch_size": 32, "workers": 2, "index_key": "Flat", "export": None}

    from blip2cli.retrieval.rank import SearchResult

    job = Recorder(SearchResult(hits=[]))
    monkeypatch.setattr("blip2cli.retrieval.rank.search_index", job)
    invoke("search", "a red bicycle", "--index", str(tmp_path / "idx"), "-k", "3", "--no-rerank", "--json")
    (index_dir, _loader, query, image), kwargs = job.calls[0]
    assert (index_dir, query, image) == (tmp_path / "idx", "a red bicycle", None)
    assert kwargs == {"model": None, "quantize": None, "k": 3, "rerank_k": None, "dedup_threshold": None}


@pytest.mark.parametrize("command", [["pretrain", "--stage", "2"], ["finetune"]])
def test_pretrain_and_finetune(command: list[str], monkeypatch, tmp_path: Path) -> None:
    job = Recorder((7, True))
    monkeypatch.setattr("blip2cli.train.loop.run", job)
    (tmp_path / "anns.json").write_text("{}")
    sets = [f"data.{split}[0].{key}={tmp_path / name}" for split in ("train", "val")
            for key, name in (("path", "anns.json"), ("image_root", ""))]  # fmt: skip
    stage2 = ["stage=2", "model.llm.name=facebook/opt-125m", "model.qformer.text=false"]  # tiny_cpu says stage: 1
    sets += stage2 if command[0] == "pretrain" else ["task=retrieval", "stage=0"]
    args = [*command, str(RECIPE), "--out", str(tmp_path / "run"), "--max-steps", "5", "--resume", "auto", "--json"]
    result = invoke(*args, *[a for s in ["train.lr=3e-4", *sets] for a in ("--set", s)])
    (recipe,), kwargs = job.calls[0]
    assert recipe.stage == (2 if command[0] == "pretrain" else 0) and recipe.train.lr == 3e-4
    assert {k: v for k, v in kwargs.items() if k != "on_log"} == {
        "out": tmp_path / "run", "resume": "auto", "stop_after": 5}
    assert json.loads(result.stdout.splitlines()[-1]) == {"out": str(tmp_path / "run"), "step": 7}


def test_help_does_not_import_torch() -> None:
    code = "import sys; from blip2cli.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_env_json_has_versions() -> None:
    result = invoke("env", "--json")
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["blip2cli"] and info["torch"] and info["python"]
    assert "java" in info
