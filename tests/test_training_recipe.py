"""`blip2 pretrain` / `blip2 finetune` and the recipe's task: the command is matched to the task before any data
path is checked (so the mismatch is named even where the data is absent), and --stage defaults to the recipe's."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.config import load_training_recipe
from blip2cli.errors import UsageError

runner = CliRunner()
ABSENT = "no/such/folder/captions.json"  # deeper than owner/name: checked as a local path


def _recipe(tmp_path: Path, **top: object) -> Path:
    raw = {"task": "pretrain", "stage": 1, "data": {"train": [{"kind": "coco", "path": ABSENT}]}, **top}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _error(*args: object) -> str:
    with pytest.raises(UsageError) as info:
        load_training_recipe(*args)
    return str(info.value)


def test_finetune_names_pretrain_before_looking_at_the_data(tmp_path):
    assert "blip2 pretrain --stage 1" in _error(_recipe(tmp_path), [], "finetune")


def test_pretrain_names_finetune_for_a_fine_tuning_recipe(tmp_path):
    recipe = _recipe(tmp_path, task="retrieval", stage=0)
    assert "`blip2 finetune`" in _error(recipe, [], "pretrain")


def test_the_right_command_then_checks_the_files(tmp_path):
    assert f"data.train[0].path: no such file or folder: {ABSENT}" in _error(_recipe(tmp_path), [], "pretrain")


def test_stage_defaults_to_the_recipes_and_a_contradiction_is_refused(tmp_path):
    data = tmp_path / "captions.json"
    data.write_text("{}")
    recipe = _recipe(tmp_path, stage=1, data={"train": [{"kind": "coco", "path": str(data)}]})
    assert load_training_recipe(recipe, [], "pretrain").stage == 1
    stage2 = ["model.llm.name=facebook/opt-125m", "model.qformer.text=false"]
    with pytest.raises(UsageError, match="says stage: 1"):  # --stage 2 on a stage-1 recipe (issue 10)
        load_training_recipe(recipe, stage2, "pretrain", 2)
    assert load_training_recipe(recipe, ["stage=2", *stage2], "pretrain", 2).stage == 2


def test_finetune_through_the_cli_with_the_data_absent(tmp_path):
    result = runner.invoke(app, ["finetune", str(_recipe(tmp_path))])
    assert result.exit_code == 2 and "blip2 pretrain --stage 1" in result.stderr


def test_pretrain_without_stage_runs_the_recipes_stage_and_a_finished_run_has_nothing_left(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # recipes/tiny_cpu.yaml's data paths are relative
    args = ["pretrain", "recipes/tiny_cpu.yaml", "--out", str(tmp_path), "--json", "--set", "train.max_steps=2",
            "--set", "train.warmup_steps=1", "--set", "train.save_every=2", "--set", "train.log_every=1"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.stderr
    assert json.loads(first.stdout.splitlines()[-1]) == {"out": str(tmp_path), "step": 2} and "stage 1" in first.stderr
    again = runner.invoke(app, [*args, "--resume", "auto"])
    assert again.exit_code == 0, again.stderr
    assert "nothing left to do" in again.stderr and again.stdout.splitlines() == [first.stdout.splitlines()[-1]]
    assert runner.invoke(app, args).exit_code == 2  # without --resume, checkpoints are still never overwritten
