"""recipes/tiny_cpu.yaml runs from a fresh clone with nothing downloaded: its images, captions and tokenizer are
shipped in recipes/tiny/ (and recipes/tiny/build.py rebuilds the same captions and tokenizer)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"


@pytest.fixture
def at_root(monkeypatch) -> Path:
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository root, as the README runs it
    return ROOT


def test_the_recipe_needs_nothing_outside_the_repository(at_root):
    recipe = load_recipe("recipes/tiny_cpu.yaml")  # check_files: every path exists
    paths = [s.path for s in recipe.data.train + recipe.data.val] + [s.image_root for s in recipe.data.train]
    assert all(Path(p).resolve().is_relative_to(ROOT) for p in [*paths, recipe.model.qformer.tokenizer])


def test_the_tokenizer_covers_every_caption_and_fits_the_recipe(at_root):
    from blip2cli.model.load import qformer_tokenizer

    recipe = load_recipe("recipes/tiny_cpu.yaml")
    tok = qformer_tokenizer(recipe.model.qformer.tokenizer)
    assert tok.bos_token == "[DEC]" and tok.pad_token_id == 0 and len(tok) <= recipe.model.qformer.vocab_size
    for split in ("train", "val"):
        coco = json.loads((TINY / f"captions_{split}.json").read_text())
        assert all((TINY / "images" / im["file_name"]).is_file() for im in coco["images"])
        ids = tok([a["caption"] for a in coco["annotations"]]).input_ids
        assert not any(tok.unk_token_id in row for row in ids)


def test_build_rebuilds_the_shipped_captions_and_tokenizer(tmp_path):
    build = runpy.run_path(str(TINY / "build.py"))["build"]
    size = build(tmp_path)
    for name in ("captions_train.json", "captions_val.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((TINY / name).read_text())
    vocab = [json.loads((d / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"] for d in (tmp_path, TINY)]
    assert vocab[0] == vocab[1] and size == len(vocab[0]) + 1  # + [DEC]
    names = [sorted(p.name for p in (d / "images").iterdir()) for d in (tmp_path, TINY)]
    assert names[0] == names[1] and len(names[0]) == 120


def test_the_shipped_recipe_trains_offline(at_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(app, ["pretrain", "--stage", "1", "recipes/tiny_cpu.yaml", "--out", str(tmp_path),
                                      "--max-steps", "2", "--json", "--set", "train.log_every=1"])
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1] == {"out": str(tmp_path), "step": 2} and all(r["loss"] > 0 for r in lines[:-1])
