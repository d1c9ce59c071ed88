"""train.feature_cache: cached frozen features change nothing but speed."""

from __future__ import annotations

import json

import pytest


from tests.training import RECIPE, losses_of, run_cli, sets_for

pytestmark = pytest.mark.usefixtures("one_thread")


def test_feature_cache_changes_nothing_but_speed(assets, tmp_path, monkeypatch):
    """Without augmentation, cached frozen features give the same losses as running the ViT every time, and
    the second epoch never runs the ViT."""
    from blip2cli.model.vision import VisionEncoder

    towers = []
    forward = VisionEncoder.forward
    monkeypatch.setattr(VisionEncoder, "forward", lambda self, x: towers.append(len(x)) or forward(self, x))
    sets = sets_for(assets, 6, **{"data.train[0].path": assets["one_caption"], "data.augment": "false",
                               "train.global_batch_size": 4})
    plain = run_cli(["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "plain"), "--json", *sets])
    assert towers == [4] * 6  # 3 steps per epoch, 2 epochs
    towers.clear()
    cache = tmp_path / "cache"
    cached = run_cli(["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "cached"), "--json", *sets,
                     "--set", f"train.feature_cache={cache}"])
    assert towers == [1] + [4] * 3  # a probe for the shape, then epoch 1 only
    assert losses_of(plain) == pytest.approx(losses_of(cached), abs=1e-6)
    meta = json.loads((cache / "meta.json").read_text())
    assert len(meta["keys"]) == 12 and meta["shape"] == [5, 64]  # 2 x 2 patches + CLS, width 64
    assert (cache / "filled.bin").read_bytes() == b"\x01" * 12  # 2 epochs of 12 images: all cached after the first


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("torchao") is None,
                    reason='torchao is not installed (pip install "blip2cli[quantize]"): no int8 tower on a CPU')
def test_an_int8_tower_has_its_own_cache(assets, tmp_path, monkeypatch):
    """Issue 15: features of an int8 ViT are other features. A cache filled by the fp32 tower is not reused
    under train.quantize: int8 (it starts over, keyed ":int8"), and the int8 cache is reused by the next int8 run."""
    import torch

    from blip2cli.config import load_training_recipe
    from blip2cli.model.vision import VisionEncoder
    from blip2cli.train.loop import build_for_training

    base = sets_for(assets, 3, **{"data.train[0].path": assets["one_caption"], "data.augment": "false",
                                "train.global_batch_size": 4, "train.feature_cache": tmp_path / "cache"})
    recipe = load_training_recipe(RECIPE, base[1::2], "pretrain", 1)
    tower = {k.removeprefix("vision.tower."): v for k, v in build_for_training(recipe, "float32").state_dict().items()
             if k.startswith("vision.tower.")}
    torch.save(tower, tmp_path / "eva.pth")  # a raw EVA file: the tower now has weights to quantize as they load
    towers = []
    forward = VisionEncoder.forward
    monkeypatch.setattr(VisionEncoder, "forward", lambda self, x: towers.append(len(x)) or forward(self, x))
    sets = [*base, "--set", f"model.vision.weights={tmp_path / 'eva.pth'}"]
    args = ["pretrain", "--stage", "1", str(RECIPE), "--json", *sets]
    run_cli([*args, "--out", str(tmp_path / "fp32")])
    assert towers == [1] + [4] * 3  # the probe, then all 12 images once
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert not meta["source"].endswith(":int8")
    for run in ("int8", "int8-again"):
        towers.clear()
        run_cli([*args, "--out", str(tmp_path / run), "--set", "train.quantize=int8"])
        assert towers == ([1] + [4] * 3 if run == "int8" else [1])  # started over once, then reused
        assert json.loads((tmp_path / "cache" / "meta.json").read_text())["source"] == meta["source"] + ":int8"
