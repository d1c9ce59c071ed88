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
