"""The strict recipe loader: unknown keys with the closest match, types, Literal choices, nested paths,
cross-field rules, --set parsing, and a lossless save/load round trip."""

from __future__ import annotations

import pytest

from blip2cli.config import (
    DataSource,
    Recipe,
    TrainConfig,
    apply_override,
    from_dict,
    load_recipe,
    parse_override,
    save_recipe,
    to_dict,
)
from blip2cli.errors import UsageError

MINIMAL = {"task": "pretrain", "stage": 1, "data": {"train": [{"kind": "coco", "path": "captions.json"}]}}


def _error(raw: dict) -> str:
    with pytest.raises(UsageError) as info:
        from_dict(Recipe, raw)
    return str(info.value)


def _with(path: str, value) -> dict:
    import copy

    raw = copy.deepcopy(MINIMAL)
    apply_override(raw, *parse_override(f"{path}={value}"))
    return raw


def test_minimal_recipe_gets_the_defaults():
    recipe = from_dict(Recipe, MINIMAL)
    assert recipe.train == TrainConfig() and recipe.data.train[0] == DataSource("coco", "captions.json")


@pytest.mark.parametrize(("path", "value", "message"), [
    ("train.lrr", "1", "train.lrr: unknown key (did you mean 'lr'?)"),
    ("model.vision.widht", "64", "model.vision.widht: unknown key (did you mean 'width'?)"),
    ("data.train[0].pth", "x", "data.train[0].pth: unknown key (did you mean 'path'?)"),
    ("zzz", "1", "zzz: unknown key (valid keys: task, stage, model, data, train)"),
])
def test_unknown_keys_name_the_path_and_the_closest_key(path, value, message):
    assert _error(_with(path, value)) == message


@pytest.mark.parametrize(("path", "value", "message"), [
    ("train.max_steps", "ten", "train.max_steps: expected an integer, got str 'ten'"),
    ("train.max_steps", "1.5", "train.max_steps: expected an integer, got float 1.5"),
    ("train.lr", "fast", "train.lr: expected a number, got str 'fast'"),
    ("train.grad_checkpointing", "1", "train.grad_checkpointing: expected true or false, got int 1"),
    ("stage", "true", "stage: expected an integer, got bool True"),
    ("train.betas", "[0.9]", "train.betas: expected 2 values, got 1"),
    ("data.train", "{}", "data.train: expected a list, got dict"),
    ("model.vision", "3", "model.vision: expected a mapping, got int 3"),
])
def test_wrong_types_are_one_line_naming_the_key(path, value, message):
    assert _error(_with(path, value)) == message


def test_literal_choices():
    assert _error(_with("train.precision", "fp8")) == \
        "train.precision: expected one of 'bf16', 'fp16', 'fp32', got 'fp8'"
    assert _error(_with("task", "classify")).startswith("task: expected one of 'pretrain', 'caption'")
    assert from_dict(Recipe, _with("train.schedule", "lavis_epoch")).train.schedule == "lavis_epoch"


def test_yaml_exponents_without_a_dot_are_numbers():
    # PyYAML (YAML 1.1) reads `1e-4` as a string; the loader accepts it for float fields
    assert from_dict(Recipe, _with("train.lr", "1e-4")).train.lr == 1e-4
    assert from_dict(Recipe, {**MINIMAL, "train": {"min_lr": "5e-5"}}).train.min_lr == 5e-5


def test_nested_rules_name_their_dotted_key():
    assert _error(_with("data.train[0].weight", "0")) == "data.train[0].weight: expected a positive number, got 0.0"
    assert _error({**MINIMAL, "data": {"train": [{"kind": "coco"}]}}) == "data.train[0].path: required key is missing"


@pytest.mark.parametrize(("sets", "message"), [
    (["stage=2"], "model.llm.name: stage 2 needs the frozen LLM"),
    (["stage=3"], "stage: expected 1 or 2 for task 'pretrain', got 3"),
    (["task=caption"], "stage: only for task 'pretrain'"),
    (["model.llm.name=facebook/opt-125m"], "model.llm.name: stage 1 trains the Q-Former without an LLM"),
    (["stage=2", "model.llm.name=facebook/opt-125m"], "model.qformer.text: stage 2 trains no Q-Former text half"),
    (["train.multi_positive=true", "data.train[0].kind=folder"],
     "data.train[0].kind: train.multi_positive needs image ids"),
    (["train.feature_cache=cache"], "train.feature_cache: needs data.augment: false"),
    (["train.feature_cache=cache", "data.augment=false", "model.vision.freeze=false"],
     "train.feature_cache: the ViT is trained"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size: 10 is not a multiple"),
    (["train.warmup_steps=10", "train.max_steps=5"], "train.warmup_steps: 10 is beyond max_steps=5"),
    (["data.train[0].kind=webdataset", "data.train[0].resampled=true"], "data.train[0].size: resampled shards"),
])
def test_impossible_combinations(sets, message):
    import copy

    raw = copy.deepcopy(MINIMAL)
    for text in sets:
        apply_override(raw, *parse_override(text))
    assert message in _error(raw)


def test_set_parsing():
    assert parse_override("train.lr=1e-4") == (["train", "lr"], "1e-4")  # converted when validated
    assert parse_override("train.max_steps=10") == (["train", "max_steps"], 10)
    assert parse_override("data.augment=false") == (["data", "augment"], False)
    assert parse_override("data.train[0].path=a=b.json") == (["data", "train", 0, "path"], "a=b.json")
    assert parse_override("data.train.1.weight=2") == (["data", "train", 1, "weight"], 2)
    assert parse_override("model.init=") == (["model", "init"], "")
    assert parse_override("train.betas=[0.9, 0.999]") == (["train", "betas"], [0.9, 0.999])
    for bad in ("train.lr", "=3", "train..lr=1"):
        with pytest.raises(UsageError, match="--set"):
            parse_override(bad)


def test_set_into_a_missing_list_item_is_an_error():
    import copy

    raw = copy.deepcopy(MINIMAL)
    with pytest.raises(UsageError, match=r"--set data.train.3: no item 3 \(the list has 1\)"):
        apply_override(raw, *parse_override("data.train[3].path=x"))


def test_load_recipe_applies_sets_before_validation(tmp_path):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    recipe = load_recipe(path, ["train.lr=3e-4", "model.qformer.num_queries=8"], check_files=False)
    assert recipe.train.lr == 3e-4 and recipe.model.qformer.num_queries == 8
    with pytest.raises(UsageError, match="train.lrr: unknown key"):
        load_recipe(path, ["train.lrr=1"], check_files=False)
    with pytest.raises(UsageError, match=r"data.train\[0\].path: no such file or folder: captions.json"):
        load_recipe(path, [])
    with pytest.raises(UsageError, match="no such recipe"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_save_and_load_round_trip(tmp_path):
    recipe = from_dict(Recipe, _with("train.betas", "[0.9, 0.999]"))
    save_recipe(recipe, tmp_path / "recipe.yaml")
    again = load_recipe(tmp_path / "recipe.yaml", check_files=False)
    assert again == recipe and to_dict(again) == to_dict(recipe)
