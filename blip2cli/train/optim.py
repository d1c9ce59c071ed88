"""AdamW parameter groups and the learning-rate schedules (paper §4, LAVIS yaml).

Groups: no weight decay for biases and 1-D weights (LayerNorms); everything else is decayed, the 0-d `temp`
and `query_tokens` included, as in LAVIS. When the ViT is trained, `lr_layer_decay` scales block i's rate by
decay^(depth - i) (embeddings: decay^(depth + 1)). LAVIS computes the same scales and then lets its
schedulers overwrite them, so there it has no effect; here it is honoured, and 1.0 reproduces LAVIS.

The schedule is a pure function of the optimizer step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from blip2cli.config import TrainConfig


def vit_layer_id(name: str, depth: int) -> int:
    """LAVIS's `get_num_layer_for_vit`: embeddings 0, block i -> i + 1, anything else depth + 1."""
    if name.startswith(("vision.tower.cls_token", "vision.tower.pos_embed", "vision.tower.patch_embed")):
        return 0
    match = re.match(r"vision\.tower\.blocks\.(\d+)\.", name)
    return int(match.group(1)) + 1 if match else depth + 1


def param_groups(model: nn.Module, cfg: TrainConfig, vit_depth: int) -> list[dict]:
    """Trainable parameters in groups keyed by (decay, lr_scale); every group carries its `lr_scale`."""
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim != 1 and not name.endswith(".bias")  # 0-d temp and 3-d query_tokens are decayed
        scale = 1.0
        if name.startswith("vision.") and cfg.lr_layer_decay < 1:
            scale = cfg.lr_layer_decay ** (vit_depth + 1 - vit_layer_id(name, vit_depth))
        group = groups.setdefault((decay, scale), {
            "params": [], "names": [], "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale,
        })
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: TrainConfig, vit_depth: int) -> torch.optim.AdamW:
    groups = param_groups(model, cfg, vit_depth)
    for g in groups:
        g.pop("names")
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: float) -> float:
    """The learning rate of optimizer step `step` (0-based).

    cosine_step (paper): linear warm-up from warmup_lr to lr over warmup_steps, then a cosine from lr to min_lr
    reached at max_steps. lavis_epoch (LAVIS `linear_warmup_cosine_lr`): during epoch 0 the warm-up by step,
    then flat at lr; from epoch e >= 1 the cosine value of e/E, constant within the epoch, never reaching
    min_lr; E = ceil(max_steps / steps_per_epoch).
    """
    if cfg.schedule == "lavis_epoch":
        epoch = int(step // steps_per_epoch)
        if epoch == 0:
            return min(cfg.lr, cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / max(cfg.warmup_steps, 1))
        epochs = max(1, math.ceil(cfg.max_steps / steps_per_epoch))
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min(step - cfg.warmup_steps, span) / span
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
