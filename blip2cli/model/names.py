"""Weight-name tables: Hugging Face and LAVIS names <-> ours (HF's conversion script), as plain prefix tables.

Ours follow LAVIS without the `Qformer.bert.` prefix (`qformer.encoder.layer.{i}.attention.self.query`), with the
vision tower under `vision.tower.` in EVA's names and the LLM's own names under `llm.model.`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from blip2cli.errors import UsageError

HF_TO_OURS: tuple[tuple[str, str], ...] = (
    ("vision_model.embeddings.class_embedding", "vision.tower.cls_token"),
    ("vision_model.embeddings.position_embedding", "vision.tower.pos_embed"),
    ("vision_model.embeddings.patch_embedding.", "vision.tower.patch_embed.proj."),
    ("vision_model.post_layernorm.", "ln_vision."),
    ("vision_model.encoder.layers.", "vision.tower.blocks."),
    ("qformer.layernorm.", "qformer.embeddings.LayerNorm."),
    ("qformer.encoder.", "qformer.encoder."),
    ("embeddings.word_embeddings.", "qformer.embeddings.word_embeddings."),
    ("embeddings.position_embeddings.", "qformer.embeddings.position_embeddings."),
    ("query_tokens", "query_tokens"),
    ("vision_projection.", "vision_proj."),
    ("text_projection.", "text_proj."),
    ("itm_head.", "itm_head."),
    ("language_projection.", "llm_proj."),
    ("language_model.", "llm.model."),
)
# Inside a vision block and a Q-Former layer the names differ only in these pieces.
HF_BLOCK_TO_OURS = ((".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."), (".self_attn.qkv.", ".attn.qkv."),
                    (".self_attn.projection.", ".attn.proj."))
HF_QFORMER_TO_OURS = ((".attention.attention.", ".attention.self."),
                      (".crossattention.attention.", ".crossattention.self."))

LAVIS_TO_OURS: tuple[tuple[str, str], ...] = (
    ("visual_encoder.", "vision.tower."),
    ("Qformer.bert.", "qformer."),
    ("Qformer.cls.", "qformer.cls."),
    ("opt_proj.", "llm_proj."),
    ("t5_proj.", "llm_proj."),
    ("ln_vision.", "ln_vision."),
    ("query_tokens", "query_tokens"),
    ("vision_proj.", "vision_proj."),
    ("text_proj.", "text_proj."),
    ("itm_head.", "itm_head."),
    ("temp", "temp"),
)
DROPPED = re.compile(r"(position_ids|cls\.predictions\.decoder\.weight)$")  # buffers and the tied LM decoder
# LAVIS's BERT LM head ties `decoder.bias = bias` and `decoder.weight = word_embeddings.weight` (its Qformer.py),
# and `state_dict()` keeps every name of a tied tensor: alias -> owner, in LAVIS's names.
LAVIS_TIED = {
    "Qformer.cls.predictions.decoder.bias": "Qformer.cls.predictions.bias",
    "Qformer.cls.predictions.decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
}


def _rename(name: str, table: Iterable[tuple[str, str]]) -> str | None:
    for src, dst in table:
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def hf_to_ours(name: str) -> str | None:
    """A Hugging Face BLIP-2 weight name -> ours (None: not a BLIP-2 weight)."""
    ours = _rename(name, HF_TO_OURS)
    if ours is None:
        return None
    pieces = HF_BLOCK_TO_OURS if ours.startswith("vision.tower.blocks.") else HF_QFORMER_TO_OURS
    if ours.startswith(("vision.tower.blocks.", "qformer.encoder.")):
        for src, dst in pieces:
            ours = ours.replace(src, dst)
    return ours


def lavis_to_ours(name: str) -> str | None:
    return _rename(name, LAVIS_TO_OURS)


def ours_to_hf(name: str) -> str | None:
    """Ours -> Hugging Face (export). None for what HF has no place for (temp, the ITG head)."""
    if name == "temp" or name.startswith("qformer.cls.") or name.endswith(".k_bias"):
        return None
    inverse = tuple((dst, src) for src, dst in HF_TO_OURS)
    if name.startswith("vision.tower.blocks."):
        for src, dst in HF_BLOCK_TO_OURS:
            name = name.replace(dst, src)
    if name.startswith("qformer.encoder."):
        for src, dst in HF_QFORMER_TO_OURS:
            name = name.replace(dst, src)
    return _rename(name, inverse)


def drop_tied_aliases(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Remove the second name of each tied tensor after checking it holds the same values as its owner (a file
    where they differ was not saved from a tied model: refused). An alias without its owner takes its place."""
    out = dict(state)
    for alias, owner in LAVIS_TIED.items():
        if alias not in out:
            continue
        tensor = out.pop(alias)
        if owner not in out:
            out[owner] = tensor
        elif out[owner].shape != tensor.shape or not torch.equal(out[owner], tensor):
            raise UsageError(f"{source}: {alias} differs from {owner}, which LAVIS ties it to: a corrupt checkpoint?")
    return out


def split_qkv_biases(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF's fused qkv bias -> q_bias, k_bias, v_bias thirds (ours keeps k as a fixed buffer, HF's conversion script)."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(".attn.qkv.bias"):
            q, k, v = tensor.chunk(3)
            stem = name[: -len("qkv.bias")]
            out[stem + "q_bias"], out[stem + "k_bias"], out[stem + "v_bias"] = q, k, v
            if k.abs().max() > 0:
                _warn(f"{name}: its key third is non-zero; keeping it as an explicit key bias")
        else:
            out[name] = tensor
    return out


def fuse_qkv_biases(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Ours -> HF: concat(q_bias, k_bias or 0, v_bias) as `qkv.bias`."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(".attn.q_bias"):
            stem = name[: -len("q_bias")]
            k = state.get(stem + "k_bias", torch.zeros_like(tensor))
            out[stem + "qkv.bias"] = torch.cat((tensor, k.to(tensor.dtype), state[stem + "v_bias"]))
        elif not name.endswith((".attn.v_bias", ".attn.k_bias")):
            out[name] = tensor
    return out


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)
