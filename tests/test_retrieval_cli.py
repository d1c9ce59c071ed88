"""`blip2 index` and `blip2 search` through the CLI: the contract's JSON lines, HTML, stale files, model checks.

Most tests patch `load_encoder` with a fake model (CliRunner with the heavy call patched); the last ones run the
real code path with the tiny random retrieval checkpoint and coco-mini photos."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.retrieval import indexer
from blip2cli.retrieval.store import Store
from tests.test_retrieval_store import D, Q, fake_embed, make_images

runner = CliRunner()
HIT_KEYS = ["rank", "path", "score", "itc", "itm"]


class FakeModel:
    """Stands in for `indexer.ModelEncoder`: image, text and ITM scores from tiny deterministic functions."""

    def __init__(self, name: str, fingerprint: str = "fake-0") -> None:
        self.name, self.fingerprint, self.num_queries, self.dim = name, fingerprint, Q, D

    def prepare(self, image):
        return image

    def embed(self, images) -> np.ndarray:
        return fake_embed(images)

    def text(self, texts) -> np.ndarray:
        v = np.random.default_rng(zlib.crc32(texts[0].encode())).standard_normal((1, D)).astype(np.float32)
        return v / np.linalg.norm(v)

    def itm(self, paths, text) -> np.ndarray:
        return np.array([zlib.crc32(p.encode()) % 100 / 50 - 1 for p in paths], dtype=np.float64)


@pytest.fixture
def fake_model(monkeypatch):
    loaded: list[str] = []

    def load(name, device="auto", dtype="auto", batch_size=32, quantize="none", revision=None, cache_dir=None):
        loaded.append(name)
        return FakeModel(name, "other-weights" if name == "other" else "fake-0")

    monkeypatch.setattr(indexer, "load_encoder", load)
    return loaded


@pytest.fixture
def indexed(tmp_path, fake_model):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    make_images(photos, 12)
    result = runner.invoke(app, ["index", str(photos), "--index", str(idx), "--model", "fake", "--json"])
    assert result.exit_code == 0, result.output
    return photos, idx, result


def lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_index_prints_the_contract_line(indexed, fake_model):
    photos, idx, result = indexed
    assert lines(result) == [
        {"index": str(idx), "added": 12, "updated": 0, "removed": 0, "unchanged": 0, "failed": [], "total": 12}
    ]
    again = runner.invoke(app, ["index", str(photos), "--index", str(idx), "--json"])
    assert lines(again)[0]["unchanged"] == 12
    assert fake_model == ["fake"]  # nothing to embed on the rerun: the model is not even loaded


def test_index_reports_unreadable_images_and_exits_1(indexed):
    photos, idx, _ = indexed
    (photos / "bad.png").write_bytes(b"\x89PNG broken")
    result = runner.invoke(app, ["index", str(photos), "--index", str(idx), "--json"])
    assert result.exit_code == 1
    record = lines(result)[-1]
    assert record["failed"][0]["path"] == str(photos / "bad.png") and record["total"] == 12


def test_index_refuses_another_model(indexed):
    photos, idx, _ = indexed
    result = runner.invoke(app, ["index", str(photos), "--index", str(idx), "--model", "other"])
    assert result.exit_code == 2 and "built with model 'fake'" in result.stderr
    assert "Traceback" not in result.output


def test_search_json_lines_with_itm_rerank(indexed):
    _, idx, _ = indexed
    result = runner.invoke(app, ["search", "a red bicycle", "--index", str(idx), "-k", "4", "--json"])
    assert result.exit_code == 0, result.output
    hits = lines(result)
    assert [list(h) for h in hits] == [HIT_KEYS] * 4 and [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert all(h["score"] == pytest.approx(h["itm"] + h["itc"]) for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_search_without_rerank_scores_are_max_over_queries(indexed):
    _, idx, _ = indexed
    result = runner.invoke(app, ["search", "a red bicycle", "--index", str(idx), "-k", "12", "--no-rerank", "--json"])
    hits = lines(result)
    text = FakeModel("fake").text(["a red bicycle"])[0]
    with Store.open(idx) as store:
        for h in hits:
            mats = store.queries(np.array([store.row_of_path(h["path"])]))[0].astype(np.float32)  # (Q, D)
            assert h["itm"] is None and h["score"] == h["itc"]
            assert h["itc"] == pytest.approx(float((mats @ text).max()), abs=1e-6)
    assert [h["itc"] for h in hits] == sorted((h["itc"] for h in hits), reverse=True) and len(hits) == 12


def test_search_by_image_finds_itself(indexed):
    photos, idx, _ = indexed
    result = runner.invoke(app, ["search", "--image", str(photos / "img0005.png"), "--index", str(idx), "--json"])
    hits = lines(result)
    assert hits[0]["path"] == str(photos / "img0005.png") and hits[0]["itm"] is None
    assert hits[0]["score"] == pytest.approx(1.0, abs=2e-3)


def test_search_html_page_is_self_contained(indexed, tmp_path):
    _, idx, _ = indexed
    page = tmp_path / "hits.html"
    result = runner.invoke(app, ["search", "a red bicycle", "--index", str(idx), "-k", "3", "--html", str(page)])
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 3  # rank, score, itc, itm, path lines
    assert f"wrote {page}" in result.stderr
    text = page.read_text()
    assert text.count("data:image/jpeg;base64,") == 3 and 'src="http' not in text
    assert "a red bicycle" in text and "ITM logit + ITC cosine" in text


def test_deleted_files_are_skipped_with_a_note(indexed):
    _, idx, _ = indexed
    before = lines(runner.invoke(app, ["search", "cat", "--index", str(idx), "-k", "3", "--no-rerank", "--json"]))
    Path(before[0]["path"]).unlink()
    result = runner.invoke(app, ["search", "cat", "--index", str(idx), "-k", "3", "--no-rerank", "--json"])
    after = lines(result)
    assert [h["path"] for h in after[:2]] == [h["path"] for h in before[1:]] and len(after) == 3
    assert "no longer exist" in result.stderr


def test_search_usage_errors(indexed, tmp_path):
    _, idx, _ = indexed
    both = runner.invoke(app, ["search", "cat", "--image", "x.jpg", "--index", str(idx)])
    assert both.exit_code == 2 and "exactly one" in both.stderr
    assert runner.invoke(app, ["search", "cat", "--index", str(tmp_path / "none")]).exit_code == 2
    other = runner.invoke(app, ["search", "cat", "--index", str(idx), "--model", "other"])
    assert other.exit_code == 2 and "cannot be compared" in other.stderr


# ---------------------------------------------------------------------------------------------------------------
# The real model path: the tiny random checkpoint on coco-mini photos


@pytest.fixture
def tiny_index(tmp_path, coco_mini, tiny_retrieval_model_dir):
    model_dir = tiny_retrieval_model_dir
    photos = sorted((coco_mini / "val2017").glob("*.jpg"))[:10]
    idx = tmp_path / "idx"
    result = runner.invoke(
        app, ["index", *map(str, photos), "--index", str(idx), "--model", str(model_dir), "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    return model_dir, photos, idx


def test_tiny_model_search_matches_the_model(tiny_index):
    import torch

    from blip2cli.data.images import load_image
    from blip2cli.data.transforms import clean_caption, eval_pixels
    from blip2cli.model.load import load_model

    model_dir, _, idx = tiny_index
    result = runner.invoke(
        app,
        ["search", "A dog on a couch.", "--index", str(idx), "-k", "3", "--rerank-k", "5", "--device", "cpu", "--json"],
    )
    assert result.exit_code == 0, result.output
    hits = lines(result)
    model = load_model(str(model_dir), "cpu")
    size, mean, std = model.cfg.vision.image_size, model.cfg.image_mean, model.cfg.image_std
    with torch.inference_mode():
        pixels = eval_pixels([load_image(h["path"]) for h in hits], size, mean, std)
        embeds = model.vision_embeds(pixels)
        text = model.text_features([clean_caption("A dog on a couch.")])[0]  # (D,)
        itc = (model.image_features(embeds) @ text).amax(dim=1)  # max over queries
        itm = model.itm_logits(embeds, [clean_caption("A dog on a couch.")] * len(hits))[:, 1]
    np.testing.assert_allclose([h["itc"] for h in hits], itc.numpy(), atol=2e-3)  # float16 storage
    np.testing.assert_allclose([h["itm"] for h in hits], itm.numpy(), atol=1e-4)


def test_tiny_model_index_is_refused_by_another_model(tiny_index, tiny_opt_dir):
    _, _, idx = tiny_index
    result = runner.invoke(app, ["search", "a dog", "--index", str(idx), "--model", str(tiny_opt_dir), "--json"])
    # a captioning model has no ITC heads: refused right after loading, before the index is read (issue #10)
    assert result.exit_code == 2 and "image-text matching model" in result.stderr
