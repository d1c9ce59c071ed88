"""Architecture values from a checkpoint's config, checked before anything is allocated.

A config.json is user input like any other: its sizes must be integers of the right kind and in range (the
dataclasses in config.py hold the ranges), and the parameters they describe must fit in this machine's memory.
The count is an estimate from the layer shapes (within a few percent for ViT, BERT and OPT/T5-style LLMs); it
only has to tell a real checkpoint from a corrupt one.
"""

from __future__ import annotations

import os
from typing import Any

from blip2cli.config import ModelConfig
from blip2cli.errors import UsageError

# Keys of a transformers text config that are sizes, under the names the families use, with sane upper bounds.
LLM_SIZES = {
    "hidden_size": 1 << 16, "d_model": 1 << 16, "n_embd": 1 << 16, "num_hidden_layers": 1024, "num_layers": 1024,
    "num_decoder_layers": 1024, "n_layer": 1024, "num_attention_heads": 1024, "num_heads": 1024, "n_head": 1024,
    "intermediate_size": 1 << 20, "ffn_dim": 1 << 20, "d_ff": 1 << 20, "vocab_size": 1 << 23,
    "max_position_embeddings": 1 << 24,
}
BYTES_PER_PARAM = 2  # the smallest dtype we load weights in (16-bit): a model refused at 2 bytes cannot fit at all


def config_int(section: Any, key: str, where: str) -> int:
    """An integer size from a transformers config object, or one line naming the config.json key."""
    value = getattr(section, key, None)
    if isinstance(value, (list, tuple)) and len(value) in (1, 2) and len(set(map(repr, value))) == 1:
        value = value[0]  # image_size / patch_size may be [n, n]
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{where}.{key}: expected an integer, got {value!r}")
    return value


def config_float(section: Any, key: str, where: str) -> float:
    value = getattr(section, key, None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise UsageError(f"{where}.{key}: expected a number, got {value!r}")
    return float(value)


def check_llm_config(llm_config: Any) -> None:
    """The LLM's sizes: integers from 1 to their bound, whichever of the family's names the config uses."""
    for key, high in LLM_SIZES.items():
        if getattr(llm_config, key, None) is None:
            continue
        value = config_int(llm_config, key, "text_config")
        if not 1 <= value <= high:
            raise UsageError(f"text_config.{key}: expected an integer from 1 to {high}, got {value}")


def parameter_count(cfg: ModelConfig, llm_config: Any = None) -> int:
    """Parameters the architecture holds (estimate; see the module docstring)."""
    v, q = cfg.vision, cfg.qformer
    vision = 0
    if v.kind == "eva":
        vision = v.depth * (4 * v.width**2 + 2 * v.width * v.mlp_dim) + (v.num_tokens + 3 * v.patch_size**2) * v.width
    cross_layers = (q.num_layers + q.cross_attention_every - 1) // q.cross_attention_every
    ffns = 2 if q.text else 1
    qformer = q.num_layers * (4 * q.hidden_size**2 + ffns * 2 * q.hidden_size * q.intermediate_size)
    qformer += cross_layers * (2 * q.hidden_size**2 + 2 * q.hidden_size * v.width)
    qformer += (q.num_queries + q.max_position_embeddings + (2 * q.vocab_size if q.text else 0)) * q.hidden_size
    return vision + qformer + (_llm_count(llm_config) if llm_config is not None else 0)


def _llm_count(c: Any) -> int:
    def first(*keys: str, default: int = 0) -> int:
        return next((getattr(c, k) for k in keys if isinstance(getattr(c, k, None), int)), default)

    h = first("hidden_size", "d_model", "n_embd")
    layers = first("num_hidden_layers", "num_layers", "n_layer") + first("num_decoder_layers")
    ffn = first("ffn_dim", "intermediate_size", "d_ff", "n_inner", default=4 * h)
    embeddings = (first("vocab_size") + first("max_position_embeddings")) * h
    return layers * (4 * h * h + 2 * h * ffn) + embeddings


def memory_bytes() -> int:
    """RAM plus the memory of every GPU: an upper bound on what any placement could use."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import torch

    if torch.cuda.is_available():
        total += sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    return total


def check_fits(cfg: ModelConfig, llm_config: Any = None) -> None:
    """Refuse, in one line, an architecture whose parameters cannot fit in this machine's memory."""
    if llm_config is not None:
        check_llm_config(llm_config)
    count = parameter_count(cfg, llm_config)
    need, have = count * BYTES_PER_PARAM, memory_bytes()
    if need > have:
        raise UsageError(f"the architecture holds ~{count / 1e9:,.1f} B parameters ({need / 2**30:,.0f} GiB even at "
                         f"16 bits), more than this machine's {have / 2**30:,.0f} GiB of memory (RAM and GPUs): "
                         "are its sizes right?")
