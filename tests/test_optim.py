"""train.optim: learning-rate schedules and parameter groups."""

from __future__ import annotations

import math

import pytest


pytestmark = pytest.mark.usefixtures("one_thread")


def test_learning_rate_schedules():
    from blip2cli.config import TrainConfig
    from blip2cli.train.optim import lr_at

    cfg = TrainConfig(lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg, 1) == pytest.approx(1e-6) and lr_at(5, cfg, 1) == pytest.approx(1e-6 + 99e-6 / 2)
    assert lr_at(10, cfg, 1) == pytest.approx(1e-4) and lr_at(60, cfg, 1) == pytest.approx(5.5e-5)
    assert lr_at(110, cfg, 1) == pytest.approx(1e-5)
    lavis = TrainConfig(lr=1e-4, min_lr=0.0, warmup_lr=1e-8, warmup_steps=4, max_steps=50, schedule="lavis_epoch")
    assert lr_at(2, lavis, 10) == pytest.approx(1e-8 + (1e-4 - 1e-8) / 2) and lr_at(9, lavis, 10) == 1e-4
    assert lr_at(10, lavis, 10) == lr_at(19, lavis, 10) == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi / 5)))
    assert lr_at(49, lavis, 10) > 0  # never reaches min_lr


def test_parameter_groups_decay_and_layer_scales():
    from blip2cli.config import ModelConfig, QFormerConfig, TrainConfig, VisionConfig
    from blip2cli.model.blip2 import Blip2
    from blip2cli.train.optim import param_groups

    vision = VisionConfig(image_size=28, width=32, depth=2, heads=4, mlp_dim=64, freeze=False)
    model = Blip2(ModelConfig(vision=vision, qformer=QFormerConfig(num_queries=4, hidden_size=32, num_layers=2,
                                                                   num_heads=4, intermediate_size=64, vocab_size=50)))
    groups = param_groups(model, TrainConfig(lr_layer_decay=0.5), vit_depth=2)
    where = {n: g for g in groups for n in g["names"]}
    assert where["temp"]["weight_decay"] == 0.05 and where["query_tokens"]["weight_decay"] == 0.05
    assert where["ln_vision.weight"]["weight_decay"] == 0.0 and where["vision_proj.bias"]["weight_decay"] == 0.0
    assert where["vision.tower.blocks.0.attn.q_bias"]["weight_decay"] == 0.0
    assert where["vision.tower.patch_embed.proj.weight"]["lr_scale"] == 0.5 ** 3
    assert where["vision.tower.blocks.0.mlp.fc1.weight"]["lr_scale"] == 0.5 ** 2
    assert where["vision.tower.blocks.1.mlp.fc1.weight"]["lr_scale"] == 0.5
    assert where["qformer.encoder.layer.0.attention.self.query.weight"]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
