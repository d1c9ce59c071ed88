"""Typed configuration: the dataclasses are the schema and the only home of defaults.

Recipes are YAML files read with `yaml.safe_load` and converted by `from_dict`, a small strict loader:
unknown keys (with the closest valid key), wrong scalar types and bad `Literal` choices are one-line
`UsageError`s naming the dotted key. `__post_init__` methods reject contradictions. Only the standard
library and PyYAML are imported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from blip2cli.errors import UsageError

# OpenAI CLIP normalisation, used by every BLIP-2 checkpoint (LAVIS processors).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_ranges(section: str, obj: Any, bounds: dict[str, tuple[float, float]]) -> None:
    """Each named field of `obj` must lie in its closed range [low, high] (architecture values: positive and within
    what any real checkpoint uses, so a corrupt or mistyped size is refused before anything is allocated)."""
    for name, (low, high) in bounds.items():
        value = getattr(obj, name)
        if not low <= value <= high:
            raise UsageError(f"{section}.{name}: expected {_span(low, high)}, got {value}")


def _span(low: float, high: float) -> str:
    return f"a value from {low:g} to {high:g}" if isinstance(low, float) else f"an integer from {low} to {high}"


_EPS = (1e-30, 1.0)  # layer norm epsilons


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
    depth: int = 39  # EVA-CLIP-g has 40 blocks; BLIP-2 uses the first 39 (LAVIS eva_vit)
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
        check_ranges("model.vision", self, {
            "image_size": (1, 8192), "patch_size": (1, max(self.image_size, 1)), "width": (1, 32768),
            "depth": (1, 512), "heads": (1, max(self.width, 1)), "mlp_dim": (1, 262144), "layer_norm_eps": _EPS,
            "ln_vision_eps": _EPS,
        })
        if self.kind == "eva" and self.width % self.heads:
            raise UsageError(f"model.vision.width: {self.width} is not divisible by heads={self.heads}")

    @property
    def num_tokens(self) -> int:
        """Vision tokens incl. CLS: 257 at 224 px, 677 at 364 px."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class QFormerConfig:
    """BERT-base layout with 32 learned queries (LAVIS Qformer)."""

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
    init_std: float = 0.02  # std of a random init's weights (BERT's initializer_range, LAVIS); a Q-Former far
    # narrower than 768 needs more (~0.8/sqrt(hidden_size)) or its outputs ignore the image (README, Training)
    max_text_len: int = 32  # 32 in training, 35 in retrieval evaluation

    def __post_init__(self) -> None:
        check_ranges("model.qformer", self, {
            "num_queries": (1, 4096), "hidden_size": (1, 32768), "num_layers": (1, 512),
            "num_heads": (1, max(self.hidden_size, 1)), "intermediate_size": (1, 262144),
            "cross_attention_every": (1, 512), "vocab_size": (1, 4_000_000), "max_position_embeddings": (1, 1 << 20),
            "layer_norm_eps": _EPS, "dropout": (0.0, 0.99), "attention_dropout": (0.0, 0.99), "embed_dim": (1, 32768),
            "max_text_len": (1, max(self.max_position_embeddings, 1)),
        })
        if self.hidden_size % self.num_heads:
            raise UsageError(f"model.qformer.hidden_size: {self.hidden_size} not divisible by {self.num_heads} heads")
        if self.init_std <= 0:
            raise UsageError(f"model.qformer.init_std: expected a positive number, got {self.init_std}")
        if self.init_from and self.init_std != 0.02:
            raise UsageError("model.qformer.init_std: only for a random init; remove it or model.qformer.init_from")


@dataclass
class LLMConfig:
    """The frozen language model: any transformers causal LM (OPT, Llama, Qwen, SmolLM, ...) or Flan-T5."""

    name: str = ""  # hub id or local directory of the LLM (weights + tokenizer); "" = none (stage 1)
    prompt: str = ""  # default prompt for captions, e.g. "a photo of"
    eos_text: str = "\n"  # captions end with this in training and generation stops at it (OPT: "\n" = 50118)
    max_text_len: int = 32

    def __post_init__(self) -> None:
        check_ranges("model.llm", self, {"max_text_len": (1, 1 << 20)})

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

    def __post_init__(self) -> None:
        if not all(0 < s <= 10 for s in self.image_std):
            raise UsageError(f"model.image_std: expected three values in (0, 10], got {list(self.image_std)}")
        if not all(-10 <= m <= 10 for m in self.image_mean):
            raise UsageError(f"model.image_mean: expected three values in [-10, 10], got {list(self.image_mean)}")


@dataclass
class GenerationOptions:
    """Decoding settings for captions and answers (LAVIS configs). Lengths count new tokens only."""

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
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
                and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if required:
        raise UsageError(f"{path + '.' if path else ''}{required[0]}: required key is missing")
    try:
        return cls(**kwargs)
    except UsageError as exc:  # __post_init__ may name a bare field ("weight: ..."): give it its dotted path
        message = str(exc)
        if path and message.split(":", 1)[0] in names:
            raise UsageError(f"{path}.{message}") from None
        raise


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
        if not any(value == c and type(value) is type(c) for c in choices):  # `true` is not the choice 1
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
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string: accept what float() accepts
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None:
                return _convert(tp, number, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{path}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):  # YAML's .nan / .inf parse as floats; no setting means either
            raise UsageError(f"{path}: expected a finite number, got {value}")
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

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UsageError(f"{path}: not valid YAML") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: not a recipe (expected a mapping)")
    try:
        return from_dict(ModelConfig, raw.get("model"), "model")
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from None


_ = typing  # typing is imported for get_type_hints on string annotations


# ---------------------------------------------------------------------------------------------------------------
# Training recipes: `blip2 pretrain --stage 1|2 RECIPE.yaml` and `blip2 finetune RECIPE.yaml`

Task = Literal["pretrain", "caption", "retrieval", "vqa"]
LM_TASKS = ("caption", "vqa")  # fine-tunes trained with the LLM loss; retrieval uses the stage-1 losses
SOURCE_KINDS_WITH_IDS = ("coco", "lavis_json", "jsonl")  # annotation files carrying image ids


@dataclass
class DataSource:
    """One data source of a recipe; `data.datasets.build_dataset` turns it into a torch dataset. Checked here, so a
    mistake is reported with its dotted key before anything loads."""

    kind: Literal["coco", "lavis_json", "jsonl", "folder", "webdataset"]
    # coco: a COCO caption file ({images, annotations}); lavis_json: [{image, caption, image_id}];
    # jsonl: one {image, caption} or {image, question, answers} per line; folder: images with .txt sidecars;
    # webdataset: a folder of .tar shards, a glob, or a brace pattern ("shards/{00000..00099}.tar")
    path: str  # annotation file, folder, or shards (folder, glob, brace pattern); relative to the working directory
    image_root: str = ""  # folder the annotation's image paths are relative to; "" = the annotation file's folder
    weight: float = 1.0  # draws per epoch = round(weight * len(source)); webdataset: mixing probability
    max_words: int = 50  # captions and questions are cut to this many words (LAVIS processors)
    resampled: bool = False  # webdataset: draw shards with replacement, endless (needs `size`)
    shuffle: int = 1000  # webdataset: sample shuffle buffer (over undecoded bytes) and shard shuffle; 0 = off
    size: int = 0  # webdataset: samples per epoch (sizes.json); needed for resampled shards and lavis_epoch

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise UsageError(f"weight: expected a positive number, got {self.weight}")
        if self.max_words < 1:
            raise UsageError(f"max_words: expected at least 1, got {self.max_words}")
        if self.shuffle < 0 or self.size < 0:
            raise UsageError(f"{'shuffle' if self.shuffle < 0 else 'size'}: expected 0 or more")
        if self.kind == "webdataset" and self.resampled and not self.size:
            raise UsageError("size: resampled shards are endless; give the samples per epoch (e.g. from sizes.json)")


@dataclass
class DataConfig:
    """What to train on and how images are prepared. The image size is `model.vision.image_size` (224 to
    pretrain, 364 for COCO fine-tunes), the batch sizes are in `train`."""

    train: list[DataSource] = field(default_factory=list)
    val: list[DataSource] = field(default_factory=list)  # held out for the eval hook (validation loss)
    augment: bool = True  # random resized crop + flip (LAVIS processors); false: the eval resize (feature_cache)
    randaugment: bool = False  # `blip_image_train`'s RandAugment (LAVIS's VG captions); needs augment
    crop_scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop area range (LAVIS: 0.5-1.0)
    question_template: str = "Question: {} Answer:"  # vqa: what the LLM reads (paper §4.3); {} = the question
    num_workers: int = 4  # DataLoader worker processes per rank (0 = load in the training process)
    val_batches: int = 20  # micro-batches per evaluation and rank

    def __post_init__(self) -> None:
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UsageError(f"crop_scale: expected 0 < low <= high <= 1, got {list(self.crop_scale)}")
        if self.randaugment and not self.augment:
            raise UsageError("randaugment: needs augment: true")
        if "{}" not in self.question_template:
            raise UsageError(f"question_template: must contain {{}} for the question, got {self.question_template!r}")
        if self.num_workers < 0:
            raise UsageError(f"num_workers: expected 0 or more, got {self.num_workers}")
        if self.val_batches < 1:
            raise UsageError(f"val_batches: expected at least 1, got {self.val_batches}")


@dataclass
class TrainConfig:
    """Optimisation (paper §4, LAVIS yaml). Defaults are the paper's stage-1 values; recipes spell out each one."""

    lr: float = 1e-4  # peak learning rate, reached after warm-up
    min_lr: float = 1e-5  # cosine floor (maintainer, LAVIS #243: 1e-5 stage 1, 5e-5 stage 2)
    warmup_lr: float = 1e-6  # learning rate at step 0, raised linearly to `lr`
    warmup_steps: int = 2000
    max_steps: int = 250_000  # optimizer steps; the cosine reaches min_lr here
    global_batch_size: int = 1680  # samples per optimizer step over all processes
    micro_batch_size: int = 105  # samples per forward pass and process; accumulation = global / (micro * world)
    weight_decay: float = 0.05  # AdamW; not on biases and 1-D weights; temp and query_tokens are decayed
    betas: tuple[float, float] = (0.9, 0.98)  # paper; LAVIS code defaults to (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 0.0  # clip the gradient norm; 0 = off (LAVIS never clips, HF modeling_blip_2)
    schedule: Literal["cosine_step", "lavis_epoch"] = "cosine_step"  # paper (per step) or LAVIS (per epoch)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast for the trained parts and the frozen towers'
    # dtype on GPUs; CPUs always run fp32 (no fp16 LayerNorm there, HF modeling_blip_2); Flan-T5 never runs fp16
    grad_checkpointing: bool = False  # recompute the ViT blocks in the backward pass when the ViT is trained
    lr_layer_decay: float = 1.0  # ViT block i gets lr * decay^(depth - i) when trained; inert in LAVIS (its
    # schedulers overwrite every group's LR), honoured here: 1.0 reproduces LAVIS
    multi_positive: bool = False  # ITC/ITM treat every caption of the same image as a positive (COCO retrieval)
    save_every: int = 5000  # a step folder every N optimizer steps (and at the last step)
    log_every: int = 50  # a metrics line every N optimizer steps
    eval_every: int = 0  # validation loss on data.val every N steps; 0 = never
    seed: int = 42
    feature_cache: str = ""  # folder caching the frozen ViT's output per image (before ln_vision, which trains),
    # so later epochs skip the ViT; needs data.augment: false and a frozen ViT; "" = off
    keep_last: int = 0  # keep only the newest N step folders; 0 = keep all
    stuck_warning_steps: int = 500  # stage 1: warn once when ITM sits at its prior H(1/3) = 0.637 or ITC at
    # ln(micro_batch_size x processes) for this many optimizer steps (train/health.py); 0 = never
    fsdp: bool = False  # with several processes, shard the frozen ViT and LLM block by block (FSDP2) so each
    # process holds 1/N of them; the trained parts stay replicated under DDP (train/sharding.py)
    quantize: Literal["none", "int8", "int4"] = "none"  # store the frozen ViT's and LLM's linear layers in int8
    # (torchao on CPU, LLM.int8 on CUDA) or NF4 (CUDA): QLoRA-style memory; the trained parts stay full precision

    def __post_init__(self) -> None:
        positive = {"lr": self.lr, "max_steps": self.max_steps, "global_batch_size": self.global_batch_size,
                    "micro_batch_size": self.micro_batch_size, "save_every": self.save_every,
                    "log_every": self.log_every}
        for name, value in positive.items():
            if value <= 0:
                raise UsageError(f"{name}: expected a positive number, got {value}")
        for name in ("min_lr", "warmup_lr", "weight_decay", "max_grad_norm", "warmup_steps", "eval_every", "keep_last",
                     "stuck_warning_steps"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name}: expected 0 or more, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise UsageError(f"min_lr: {self.min_lr} is above lr={self.lr}")
        if self.warmup_steps > self.max_steps:
            raise UsageError(f"warmup_steps: {self.warmup_steps} is beyond max_steps={self.max_steps}")
        if self.global_batch_size % self.micro_batch_size:
            raise UsageError(f"global_batch_size: {self.global_batch_size} is not a multiple of "
                             f"micro_batch_size={self.micro_batch_size}")
        if not 0 < self.lr_layer_decay <= 1:
            raise UsageError(f"lr_layer_decay: expected a value in (0, 1], got {self.lr_layer_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise UsageError(f"betas: expected two values in [0, 1), got {list(self.betas)}")
        if not 0 < self.eps < 1:
            raise UsageError(f"eps: expected a value in (0, 1), got {self.eps}")
        if self.lr > 1 or self.warmup_lr > 1:
            raise UsageError(f"{'lr' if self.lr > 1 else 'warmup_lr'}: {max(self.lr, self.warmup_lr)} is not a "
                             "learning rate (expected at most 1, e.g. 1e-4)")
        if self.weight_decay >= 1:
            raise UsageError(f"weight_decay: expected a value in [0, 1), got {self.weight_decay}")
        if self.quantize != "none" and self.fsdp:
            raise UsageError("train.quantize: quantized frozen towers are not sharded by train.fsdp; use one or the "
                             "other (quantized weights already take a quarter of the memory or less)")


@dataclass
class Recipe:
    """Everything a training run needs; saved as recipe.yaml beside every checkpoint (its `model:` section is
    how `load_model` rebuilds the network)."""

    task: Task = "pretrain"  # pretrain (see stage), or a fine-tune: caption, retrieval, vqa
    stage: int = 0  # pretrain: 1 = ITC + ITM + ITG on the Q-Former, 2 = LM loss through the frozen LLM
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.task == "pretrain" and self.stage not in (1, 2):
            raise UsageError(f"stage: expected 1 or 2 for task 'pretrain', got {self.stage}")
        if self.task != "pretrain" and self.stage:
            raise UsageError(f"stage: only for task 'pretrain'; this is a '{self.task}' recipe (run it with "
                             "`blip2 finetune`, without --stage)")
        if not self.data.train:
            raise UsageError("data.train: no data sources (a list of {kind, path} entries)")
        self._check_model()
        self._check_data()

    @property
    def uses_llm(self) -> bool:
        """Stage 2, caption and VQA train through the frozen LLM; stage 1 and retrieval train the Q-Former heads."""
        return self.stage == 2 or self.task in LM_TASKS

    @property
    def name(self) -> str:
        return f"stage {self.stage}" if self.task == "pretrain" else f"task '{self.task}'"

    def _check_model(self) -> None:
        m = self.model
        if self.uses_llm:
            if not m.llm.name:
                raise UsageError(f"model.llm.name: {self.name} needs the frozen LLM (a hub id or a local folder)")
            if m.qformer.text:
                raise UsageError(f"model.qformer.text: {self.name} trains no Q-Former text half "
                                 "(LAVIS removes it for stage 2); set it to false")
        else:
            if m.llm.name:
                raise UsageError(f"model.llm.name: {self.name} trains the Q-Former without an LLM; remove it")
            if not m.qformer.text:
                raise UsageError(f"model.qformer.text: {self.name} needs the Q-Former's text half (ITC, ITM, ITG)")
        if self.train.multi_positive and self.uses_llm:
            raise UsageError(f"train.multi_positive: only for stage 1 and retrieval, not {self.name}")
        if self.train.feature_cache and not m.vision.freeze:
            raise UsageError("train.feature_cache: the ViT is trained (model.vision.freeze: false), so its "
                             "output changes every step and cannot be cached")

    def _check_data(self) -> None:
        d, t = self.data, self.train
        for split in ("train", "val"):
            kinds = {s.kind == "webdataset" for s in getattr(d, split)}
            if len(kinds) > 1:
                raise UsageError(f"data.{split}: mixes webdataset shards with annotation sources; use one or the "
                                 "other per split (convert the annotations to shards, e.g. with img2dataset)")
        for i, source in enumerate(d.train):
            if t.multi_positive and source.kind not in SOURCE_KINDS_WITH_IDS:
                raise UsageError(f"data.train[{i}].kind: train.multi_positive needs image ids, which "
                                 f"'{source.kind}' sources lack (use {', '.join(SOURCE_KINDS_WITH_IDS)})")
            if t.feature_cache and source.kind == "webdataset":
                raise UsageError(f"data.train[{i}].kind: train.feature_cache needs annotation or folder sources "
                                 "(a shard stream has no stable image keys)")
            if source.kind == "webdataset" and t.schedule == "lavis_epoch" and not source.size:
                raise UsageError(f"data.train[{i}].size: the lavis_epoch schedule needs the epoch length of shards")
        if t.feature_cache and d.augment:
            raise UsageError("train.feature_cache: needs data.augment: false (augmented images differ every epoch)")
        if self.task == "vqa" and any(s.kind not in ("jsonl",) for s in d.train):
            raise UsageError("data.train: vqa needs jsonl sources of {image, question, answers}")

    def check_files(self) -> None:
        """Paths that must exist before anything loads (hub ids and URLs are left to their loaders)."""
        for split in ("train", "val"):
            for i, source in enumerate(getattr(self.data, split)):
                key = f"data.{split}[{i}]"
                pattern = any(c in source.path for c in "{*?[") or "://" in source.path
                if source.kind != "webdataset" or not pattern:  # shard patterns and URLs are checked when read
                    _must_exist(source.path, f"{key}.path")
                if source.image_root:
                    _must_exist(source.image_root, f"{key}.image_root")
        m = self.model
        for key, value in (("model.vision.weights", m.vision.weights), ("model.llm.name", m.llm.name),
                           ("model.init", m.init), ("model.qformer.tokenizer", m.qformer.tokenizer),
                           ("model.qformer.init_from", m.qformer.init_from)):
            if value and _looks_like_path(value):
                _must_exist(value, key)


def _looks_like_path(value: str) -> bool:
    """A local path for sure (hub ids look like `owner/name`): absolute, ./ ../ ~, a weight file, or deeper."""
    return (value.startswith(("/", "./", "../", "~")) or value.endswith((".pth", ".pt", ".bin", ".safetensors"))
            or value.count("/") >= 2)


def _must_exist(path: str, key: str) -> None:
    if not Path(path).expanduser().exists():
        raise UsageError(f"{key}: no such file or folder: {path}")


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`key.sub=value` -> (["key", "sub"], value parsed as a YAML scalar). `data.train[0].path` and
    `data.train.0.path` both index lists. An empty value is the empty string."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set {text}: expected key.sub=value")
    parts: list[str | int] = []
    for piece in key.strip().replace("[", ".").replace("]", "").split("."):
        if not piece:
            raise UsageError(f"--set {text}: empty part in key '{key}'")
        parts.append(int(piece) if piece.isdigit() else piece)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        raise UsageError(f"--set {text}: cannot parse the value as YAML") from None
    return parts, parsed


def apply_override(raw: dict, parts: list[str | int], value: Any) -> None:
    """Set `value` at `parts` in the raw recipe, creating mappings on the way; validation comes later."""
    node: Any = raw
    for i, part in enumerate(parts):
        dotted = ".".join(map(str, parts[: i + 1]))
        last = i == len(parts) - 1
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise UsageError(f"--set {dotted}: no item {part} (the list has {size})")
        elif not isinstance(node, dict):
            raise UsageError(f"--set {dotted}: {'.'.join(map(str, parts[:i]))} is not a mapping")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]


def load_recipe(path: str | Path, overrides: list[str] = (), check_files: bool = True,
                stage: int | None = None) -> Recipe:
    """Read a recipe, apply `--set` overrides to the raw mapping, then validate it into a `Recipe`. `stage` is
    `--stage`: it fills in a recipe that names no stage, and contradicting the recipe's own is an error."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"no such recipe: {path}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UsageError(f"{path}: not valid YAML{where}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a recipe is a mapping of sections (task, model, data, train)")
    for text in overrides:
        apply_override(raw, *parse_override(text))
    if stage is not None:
        _apply_stage(raw, stage, path)
    recipe = from_dict(Recipe, raw)
    if check_files:
        recipe.check_files()
    return recipe


def load_training_recipe(path: str | Path, overrides: list[str], command: Literal["pretrain", "finetune"],
                         stage: int | None = None) -> Recipe:
    """The recipe `blip2 pretrain` / `blip2 finetune` runs. `stage` (--stage) defaults to the recipe's own. The
    command is matched to the recipe's task before any data path is checked, so running a recipe with the wrong
    command says so even where its data is absent."""
    recipe = load_recipe(path, overrides, check_files=False, stage=stage)
    if command == "finetune" and recipe.task == "pretrain":
        raise UsageError(f"{path}: a pretraining recipe (task: pretrain): run it with `blip2 pretrain --stage "
                         f"{recipe.stage}`")
    if command == "pretrain" and recipe.task != "pretrain":
        raise UsageError(f"{path}: a fine-tuning recipe (task: {recipe.task}): run it with `blip2 finetune`")
    recipe.check_files()
    return recipe


def _apply_stage(raw: dict, stage: int, path: Path) -> None:
    written = raw.get("stage")
    if written is not None and written != stage:
        raise UsageError(f"--stage {stage}: {path} says stage: {written!r}; drop --stage, fix the recipe, or "
                         f"override it with --set stage={stage}")
    raw["stage"] = stage


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """The resolved recipe as YAML that `load_recipe` reads back to an equal `Recipe`."""
    import yaml

    Path(path).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False, allow_unicode=True), encoding="utf-8")
