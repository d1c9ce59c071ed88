"""The image encoder: BLIP-2's EVA ViT-g/14 (native), or any timm ViT, frozen or trainable.

Parameter names follow the EVA/LAVIS file (`blocks.{i}.attn.qkv.weight`, `attn.q_bias`, ...), so
`eva_vit_g.pth` and LAVIS fine-tuned checkpoints map one to one; `load.py` maps the HF layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2cli.config import VisionConfig


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back: frozen towers keep fp16/bf16 matmuls but fp32 norms
    (LAVIS eva_vit), and run without autocast at inference."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class EvaAttention(nn.Module):
    """Multi-head self-attention with EVA's bias layout: q and v biases, the k bias fixed at zero (LAVIS eva_vit)."""

    def __init__(self, width: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(width))
            self.v_bias = nn.Parameter(torch.zeros(width))
            # Zero in every official checkpoint. A HF fused bias whose k third drifted under HF-side
            # fine-tuning is kept here (load.py warns), so it is a persistent, never-trained buffer.
            self.register_buffer("k_bias", torch.zeros(width), persistent=True)
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, self.k_bias.to(self.q_bias.dtype), self.v_bias))
        if type(self.qkv) is nn.Linear:  # fp32/bf16, or torchao int8 (it dispatches F.linear)
            qkv = F.linear(x, self.qkv.weight, bias)  # (B, N, 3D)
        else:  # a bitsandbytes layer runs its own kernel (model/quantize.py)
            qkv = self.qkv(x) if bias is None else self.qkv(x) + bias.to(x.dtype)
        q, k, v = qkv.view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # scale = Dh^-0.5 (88^-0.5 for ViT-g)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class EvaMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU, as EVA and HF ("gelu")


class EvaBlock(nn.Module):
    """Pre-norm block: no layer-scale, no relative position bias, drop-path 0 (LAVIS eva_vit)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm32(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = EvaAttention(cfg.width, cfg.heads, cfg.qkv_bias)
        self.norm2 = LayerNorm32(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = EvaMlp(cfg.width, cfg.mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, N-1, D)


class EvaViT(nn.Module):
    """EVA ViT-g/14 as BLIP-2 uses it: 39 blocks, CLS kept, no final norm, no head. Output (B, N, Dv)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        self.blocks = nn.ModuleList(EvaBlock(cfg) for _ in range(cfg.depth))
        self.grad_checkpointing = cfg.grad_checkpointing
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def width(self) -> int:
        return self.cfg.width

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))  # (B, N-1, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed  # (B, N, D)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class TimmViT(nn.Module):
    """Any timm ViT as the image encoder (e.g. CLIP ViT-L/14): all tokens of `forward_features`."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        import timm

        self.cfg = cfg
        self.model = timm.create_model(
            cfg.timm_name, pretrained=cfg.timm_pretrained, num_classes=0, img_size=cfg.image_size
        )
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)

    @property
    def width(self) -> int:
        return int(self.model.num_features)

    def forward(self, pixels: Tensor) -> Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model.forward_features(pixels.to(dtype))  # (B, N, Dv)


class VisionEncoder(nn.Module):
    """The image tower. When `cfg.freeze` is set it is frozen for good: no gradients, and `train()` cannot take
    it out of eval mode (LAVIS eva_vit: frozen towers stay in eval mode permanently)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tower = EvaViT(cfg) if cfg.kind == "eva" else TimmViT(cfg)
        self.frozen = cfg.freeze
        if self.frozen:
            self.requires_grad_(False)
            super().train(False)

    @property
    def width(self) -> int:
        return self.tower.width

    def train(self, mode: bool = True) -> VisionEncoder:
        return super().train(mode and not self.frozen)

    def forward(self, pixels: Tensor) -> Tensor:
        if self.frozen:
            with torch.no_grad():
                return self.tower(pixels)
        return self.tower(pixels)


def interpolate_pos_embed(pos_embed: Tensor, num_tokens: int) -> Tensor:
    """Resize a (1, 1+n*n, D) position table to (1, num_tokens, D): CLS kept, the grid resized bicubic with
    align_corners=False (LAVIS eva_vit: 224 -> 364 or 490 px)."""
    if pos_embed.shape[1] == num_tokens:
        return pos_embed
    old = math.isqrt(pos_embed.shape[1] - 1)
    new = math.isqrt(num_tokens - 1)
    if old * old + 1 != pos_embed.shape[1] or new * new + 1 != num_tokens:
        raise ValueError(f"cannot interpolate {pos_embed.shape[1]} positions to {num_tokens}: not square grids")
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    D = grid.shape[-1]
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, D).to(pos_embed.dtype)
    return torch.cat((cls, grid), dim=1)
