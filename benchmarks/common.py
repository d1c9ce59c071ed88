"""Shared by the benchmarks: random weights with realistic scales for a mid-size BLIP-2."""

from __future__ import annotations

import torch


def random_init(model: torch.nn.Module, seed: int = 0) -> None:
    """N(0, 0.02) weights, zero biases, LayerNorm weights near 1: activations stay in a realistic range, unlike
    transformers' BLIP-2 vision init (std 1e-10)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name.lower() or "layer_norm" in name.lower():
                p.copy_(1.0 + 0.05 * torch.randn(p.shape, generator=g) if name.endswith("weight") else 0 * p)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
