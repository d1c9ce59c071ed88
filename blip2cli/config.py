"""Typed configuration: the dataclasses are the schema and the only home of defaults.

Recipes are YAML files read with `yaml.safe_load` and converted by `from_dict`, a small strict loader:
unknown keys (with the closest valid key), wrong scalar types and bad `Literal` choices are one-line
`UsageError`s naming the dotted key. `__post_init__` methods reject contradictions. Only the standard
library and PyYAML are imported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from blip2cli.errors import UsageError

# OpenAI CLIP normalisation, used by every BLIP-2 checkpoint (spec §2.3).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """The frozen image encoder. `eva` is BLIP-2's EVA ViT-g/14 (native code, LAVIS and HF weight layouts);
    `timm` is any timm ViT (e.g. `vit_large_patch14_clip_224.openai`) used as an alternative frozen tower."""

    kind: Literal["eva", "timm"] = "eva"
    weights: str = ""  # where the frozen tower's weights come from: eva_vit_g.pth, or a HF BLIP-2 dir / hub id
    timm_name: str = ""  # timm model name when kind == "timm"
    timm_pretrained: bool = False  # let timm fetch its own weights (needs the hub) when kind == "timm"
    image_size: int = 224  # 224 for pretraining, 364 for COCO fine-tunes, 490 for VQA fine-tunes
    patch_size: int = 14
    width: int = 1408  # D_v
    depth: int = 39  # EVA-CLIP-g has 40 blocks; BLIP-2 uses the first 39 (spec §2.1)
    heads: int = 16
    mlp_dim: int = 6144
    layer_norm_eps: float = 1e-6
    ln_vision_eps: float = 1e-5  # LAVIS ln_vision; HF uses 1e-6 (difference negligible)
    qkv_bias: bool = True  # separate q/v biases with an implicit zero k bias (EVA layout)
    freeze: bool = True  # frozen towers stay in eval mode and never get gradients
    grad_checkpointing: bool = False  # used when the ViT is fine-tuned (COCO caption/retrieval)

    def __post_init__(self) -> None:
        if self.kind == "timm" and not self.timm_name:
            raise UsageError("model.vision.timm_name: required when model.vision.kind is 'timm'")
        if self.kind == "eva" and self.width % self.heads:
            raise UsageError(f"model.vision.width: {self.width} is not divisible by heads={self.heads}")

    @property
    def num_tokens(self) -> int:
        """Vision tokens incl. CLS: 257 at 224 px, 677 at 364 px."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class QFormerConfig:
    """BERT-base layout with 32 learned queries (spec §3)."""

    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_every: int = 2  # cross-attention in layers 0, 2, 4, ... (BLIP-2 §3.1)
    vocab_size: int = 30523  # bert-base-uncased + [DEC]
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    embed_dim: int = 256  # ITC projection width
    text: bool = True  # keep the text half (embeddings, text FFNs, LM head); stage-2 checkpoints drop it
    tokenizer: str = "bert-base-uncased"  # hub id or directory; [DEC] is added as bos_token if missing
    init_from: str = ""  # "bert-base-uncased" initialises from BERT as LAVIS does; "" = random init
    max_text_len: int = 32  # 32 in training, 35 in retrieval evaluation

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise UsageError(f"model.qformer.hidden_size: {self.hidden_size} not divisible by {self.num_heads} heads")


@dataclass
class LLMConfig:
    """The frozen language model: any transformers causal LM (OPT, Llama, Qwen, SmolLM, ...) or Flan-T5."""

    name: str = ""  # hub id or local directory of the LLM (weights + tokenizer); "" = none (stage 1)
    prompt: str = ""  # default prompt for captions, e.g. "a photo of"
    eos_text: str = "\n"  # captions end with this in training and generation stops at it (OPT: "\n" = 50118)
    max_text_len: int = 32

    @property
    def enabled(self) -> bool:
        return bool(self.name)


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    init: str = ""  # a checkpoint (anything --model accepts) whose matching weights initialise the model


@dataclass
class GenerationOptions:
    """Decoding settings for captions and answers (spec §6). Lengths count new tokens only."""

    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    do_sample: bool = False  # nucleus sampling with top_p/temperature instead of beam search
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise UsageError(f"--num-beams: expected at least 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens: expected at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UsageError(f"--min-new-tokens: expected 0..{self.max_new_tokens}, got {self.min_new_tokens}")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise UsageError(
                f"--num-captions: {self.num_return_sequences} needs at least as many beams (got {self.num_beams})"
            )
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p: expected a value in (0, 1], got {self.top_p}")
        if self.temperature <= 0:
            raise UsageError(f"--temperature: expected a positive value, got {self.temperature}")


# ---------------------------------------------------------------------------------------------------------------
# The strict loader


def from_dict(cls: type, raw: Any, path: str = "") -> Any:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types with one clear line."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path or 'recipe'}: expected a mapping, got {_describe(raw)}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
            raise UsageError(f"{dotted}: unknown key{hint}")
        kwargs[key] = _convert(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without default
        raise UsageError(f"{path or 'recipe'}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain data (tuples become lists) that `from_dict` reads back."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except UsageError as exc:
                errors.append(str(exc))
        raise UsageError(errors[0] if errors else f"{path}: unexpected {_describe(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise UsageError(f"{path}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{path}: expected a list, got {_describe(value)}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UsageError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UsageError(f"{path}: expected a mapping, got {_describe(value)}")
        _, vt = get_args(tp) or (Any, Any)
        return {str(k): _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UsageError(f"{path}: expected a string, got {_describe(value)}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise UsageError(f"{path}: expected a path, got {_describe(value)}")
        return Path(value)
    raise TypeError(f"config field {path} has an unsupported type {tp!r}")  # a bug in the schema, not user input


def model_config_from_yaml(path: Path) -> ModelConfig:
    """The `model:` section of a saved recipe (a run directory's recipe.yaml)."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: not a recipe (expected a mapping)")
    return from_dict(ModelConfig, raw.get("model"), "model")


_ = typing  # typing is imported for get_type_hints on string annotations
