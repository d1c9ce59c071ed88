"""Every shipped recipe loads, and the paper recipes carry paper §4, LAVIS yaml's hyperparameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from blip2cli.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_the_recipes_are_there():
    names = {p.stem for p in RECIPES}
    assert {"pretrain_stage1", "pretrain_stage2_opt2.7b", "pretrain_stage2_flant5xl", "finetune_coco_caption",
            "finetune_coco_retrieval", "finetune_vqav2", "tiny_cpu"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads(path):
    recipe = load_recipe(path, check_files=False)  # data and weights live elsewhere
    assert (recipe.task == "pretrain") == path.stem.startswith(("pretrain", "tiny"))
    t = recipe.train
    assert t.warmup_steps <= t.max_steps and t.global_batch_size % t.micro_batch_size == 0
    if recipe.task != "pretrain":
        assert not recipe.model.vision.freeze and t.grad_checkpointing  # fine-tunes train the ViT


def _load(name: str):
    return load_recipe(next(p for p in RECIPES if p.stem == name), check_files=False)


def test_pretraining_hyperparameters_follow_the_paper():
    s1, s2 = _load("pretrain_stage1"), _load("pretrain_stage2_opt2.7b")
    assert (s1.stage, s1.train.lr, s1.train.min_lr, s1.train.warmup_lr) == (1, 1e-4, 1e-5, 1e-6)
    assert (s1.train.max_steps, s1.train.warmup_steps, s1.train.global_batch_size) == (250_000, 2000, 1680)
    assert s1.train.betas == (0.9, 0.98) and s1.train.weight_decay == 0.05 and s1.model.vision.image_size == 224
    assert (s2.stage, s2.train.min_lr, s2.train.max_steps, s2.train.global_batch_size) == (2, 5e-5, 80_000, 1920)
    assert s2.model.llm.name == "facebook/opt-2.7b" and s2.model.llm.eos_text == "\n"
    t5 = _load("pretrain_stage2_flant5xl")
    assert t5.train.global_batch_size == 1520 and t5.train.precision == "bf16"


def test_fine_tune_hyperparameters_follow_lavis():
    cap, ret = _load("finetune_coco_caption"), _load("finetune_coco_retrieval")
    for r in (cap, ret):
        assert (r.train.lr, r.train.min_lr, r.train.warmup_lr, r.train.warmup_steps) == (1e-5, 0.0, 1e-8, 1000)
        assert r.model.vision.image_size == 364 and r.train.schedule == "lavis_epoch"
    assert cap.train.global_batch_size == 256 and cap.model.llm.prompt == "a photo of"
    assert ret.train.global_batch_size == 224 and ret.train.multi_positive and ret.train.lr_layer_decay == 0.95
    vqa = _load("finetune_vqav2")
    assert vqa.model.vision.image_size == 490 and vqa.train.global_batch_size == 128
