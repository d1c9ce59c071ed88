"""Recipe values out of range and a contradicting --stage: one line, exit 2, before anything loads (issue 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.config import load_recipe
from blip2cli.errors import UsageError

runner = CliRunner()
TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """tiny_cpu.yaml with its data pointing at a file that exists (nothing is trained here)."""
    raw = yaml.safe_load(TINY.read_text())
    (tmp_path / "captions.json").write_text('{"images": [], "annotations": []}')
    raw["data"] = {"train": [{"kind": "coco", "path": str(tmp_path / "captions.json"), "image_root": str(tmp_path)}]}
    raw["model"]["qformer"]["tokenizer"] = str(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


BAD = [  # --set, what the one line names
    ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
    ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
    ("train.lr=-.inf", "train.lr: expected a finite number"),
    ("train.lr=nan", "train.lr: expected a finite number"),
    ("train.lr=5", "train.lr: 5.0 is not a learning rate"),
    ("train.weight_decay=.nan", "train.weight_decay: expected a finite number"),
    ("train.betas=[0.9, .nan]", "train.betas[1]: expected a finite number"),
    ("train.eps=0", "train.eps: expected a value in (0, 1)"),
    ("model.vision.heads=0", "model.vision.heads: expected an integer from 1 to 64, got 0"),
    ("model.vision.heads=-4", "model.vision.heads: expected an integer from 1"),
    ("model.vision.width=0", "model.vision.width: expected an integer from 1"),
    ("model.vision.depth=100000", "model.vision.depth: expected an integer from 1 to 512"),
    ("model.vision.image_size=-56", "model.vision.image_size"),
    ("model.vision.layer_norm_eps=0", "model.vision.layer_norm_eps"),
    ("model.qformer.num_heads=0", "model.qformer.num_heads: expected an integer from 1"),
    ("model.qformer.num_queries=0", "model.qformer.num_queries"),
    ("model.qformer.hidden_size=0", "model.qformer.hidden_size"),
    ("model.qformer.dropout=1.5", "model.qformer.dropout"),
    ("model.qformer.max_text_len=1000", "model.qformer.max_text_len: expected an integer from 1 to 64"),
    ("data.train[0].weight=.inf", "data.train[0].weight: expected a finite number"),
    ("data.crop_scale=[.nan, 1]", "data.crop_scale[0]: expected a finite number"),
    ("model.image_std=[0.5, 0, 0.5]", "model.image_std: expected three values in (0, 10]"),
    ("model.image_mean=[0.5, .inf, 0.5]", "model.image_mean[1]: expected a finite number"),
]


@pytest.mark.parametrize("setting,message", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_one_line_exit_2(recipe: Path, setting: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        load_recipe(recipe, [setting], check_files=False)
    assert message in str(info.value)
    result = runner.invoke(app, ["pretrain", "--stage", "1", str(recipe), "--set", setting])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in " ".join(lines) and "Traceback" not in result.output, result.output


def test_a_contradicting_stage_is_an_error(recipe: Path) -> None:
    raw = yaml.safe_load(recipe.read_text())
    raw["stage"] = 3
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(UsageError, match=r"--stage 1: .* says stage: 3"):
        load_recipe(recipe, stage=1, check_files=False)
    result = runner.invoke(app, ["pretrain", "--stage", "1", str(recipe)])
    assert result.exit_code == 2 and "says stage: 3" in result.output and "Traceback" not in result.output
    raw["stage"] = 2
    recipe.write_text(yaml.safe_dump(raw))
    with pytest.raises(UsageError, match="says stage: 2"):
        load_recipe(recipe, stage=1, check_files=False)


def test_stage_fills_in_a_recipe_without_one_and_agrees_with_its_own(recipe: Path) -> None:
    assert load_recipe(recipe, stage=1, check_files=False).stage == 1  # tiny_cpu says stage: 1
    raw = yaml.safe_load(recipe.read_text())
    del raw["stage"]
    recipe.write_text(yaml.safe_dump(raw))
    assert load_recipe(recipe, stage=1, check_files=False).stage == 1
