"""LAVIS `.pth` checkpoints: partial state dicts under "model" (LAVIS model zoo), their config read from the shapes.

Files without a ViT, and stage-2 files, need their other parts named. From the command line that is a small YAML
model file given to `--model`:

    checkpoint: blip2_pretrained_opt2.7b.pth   # relative to this file
    vision: Salesforce/blip2-opt-2.7b          # eva_vit_g.pth, or a BLIP-2 folder / hub id whose ViT is the same
    llm: facebook/opt-2.7b
    tokenizer: bert-base-uncased               # the Q-Former's (stage-1 files only)

A LAVIS file holds no head counts and no text length. The model file may state them (and the image size, when it
differs from the ViT's); whatever is neither stated nor in the file is guessed, and one note names each guess:

    qformer_heads: 12       # guessed as width / 64 (BERT-base)
    vision_heads: 16        # guessed 16 for ViT-g (head width 88), else width / 64; only when the ViT comes
                            # from the LAVIS file or eva_vit_g.pth (a BLIP-2 folder states its own)
    max_text_len: 32        # LAVIS's max_txt_len; guessed 32 unless the runner saved its config in the file
    image_size: 364         # default: the ViT's position table (224 for eva_vit_g.pth)
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from torch import Tensor

from blip2cli.config import LLMConfig, ModelConfig, QFormerConfig, VisionConfig, from_dict
from blip2cli.errors import UsageError
from blip2cli.model.hf_config import model_config_from_hf
from blip2cli.model.hub import download
from blip2cli.model.names import DROPPED, drop_tied_aliases, lavis_to_ours
from blip2cli.model.weights import safe_torch_load


@dataclass(frozen=True)
class Architecture:
    """What a LAVIS file does not hold; None = not stated (read from the file's saved config, else guessed)."""

    qformer_heads: int | None = None
    vision_heads: int | None = None
    max_text_len: int | None = None
    image_size: int | None = None


@dataclass
class LavisFile:
    """A LAVIS checkpoint read and translated: the config it implies and its weights under our names."""

    config: ModelConfig
    tensors: list[tuple[str, Tensor]]
    allow_missing: tuple[str, ...]  # prefixes the file does not hold (the LLM, and the ViT when named alongside)


def read_lavis(path: Path, vision: str | None, llm: str | None, tokenizer: str = "bert-base-uncased",
               stated: Architecture | None = None) -> LavisFile:
    """LAVIS checkpoints are partial state dicts under "model" (LAVIS model zoo). Stage-1 files keep the ITG head and
    temperature; the ViT comes from the file (fine-tuned ones) or from `vision`; the LLM from `llm`."""
    raw = safe_torch_load(path)
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or "query_tokens" not in state:
        raise UsageError(f"{path}: not a LAVIS BLIP-2 checkpoint (no query_tokens)")
    odd = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)), None)
    if odd is not None:
        raise UsageError(f"{path}: not a LAVIS BLIP-2 checkpoint ({odd!r} under 'model' is not a tensor)")
    state = drop_tied_aliases(state, str(path))  # LAVIS saves the tied decoder.bias/.weight beside their owners
    has_vision = any(k.startswith("visual_encoder.") for k in state)
    if not has_vision and not vision:
        raise UsageError(f"{path} has no vision weights: give --model a model .yaml naming `checkpoint` and `vision` "
                         "(eva_vit_g.pth, or a BLIP-2 hub id such as Salesforce/blip2-itm-vit-g whose ViT is the same)")
    if ("opt_proj.weight" in state or "t5_proj.weight" in state) and not llm:
        raise UsageError(f"{path} is a stage-2 checkpoint: give --model a model .yaml naming `checkpoint`, `vision` "
                         "and its frozen `llm` (e.g. facebook/opt-2.7b)")
    saved = _saved_config(raw)
    stated = replace(stated or Architecture(), **{k: v for k, v in saved.items() if getattr(stated, k, None) is None})
    cfg = _lavis_config(state, path, llm, vision, stated)
    cfg = replace(cfg, vision=replace(cfg.vision, weights="" if has_vision else str(vision)),
                  qformer=replace(cfg.qformer, tokenizer=tokenizer))
    ours = ((lavis_to_ours(n), t) for n, t in state.items())
    expected_missing = ("vision.",) if not has_vision else ()
    return LavisFile(cfg, [(n, t) for n, t in ours if n is not None and not DROPPED.search(n)],
                     expected_missing + ("llm.",))


def _saved_config(raw: object) -> dict[str, int]:
    """max_txt_len and image_size from the config LAVIS's runner saves beside the weights ({"config": {"model"}})."""
    config = raw.get("config") if isinstance(raw, dict) else None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return {}
    pairs = (("max_text_len", model.get("max_txt_len")), ("image_size", model.get("image_size")))
    return {k: v for k, v in pairs if isinstance(v, int) and not isinstance(v, bool) and v > 0}


def _lavis_config(state: dict[str, Tensor], path: Path, llm: str | None, vision: str | None,
                  stated: Architecture) -> ModelConfig:
    """Shapes in a LAVIS file -> ModelConfig, with the values it lacks as stated, taken from the BLIP-2 directory
    named as `vision`, or guessed (one note names the guesses)."""
    guesses: list[str] = []
    vcfg, heads = _vision_config(state, path, vision, stated.vision_heads, guesses)
    vcfg = replace(vcfg, ln_vision_eps=1e-5, image_size=stated.image_size or vcfg.image_size)  # LAVIS's ln_vision
    qcfg = _qformer_config(state, path, stated.qformer_heads or heads, guesses)
    max_len = stated.max_text_len
    if max_len is None:
        max_len = 32
        guesses.append("max_text_len 32 (LAVIS's default max_txt_len)")
    qcfg = replace(qcfg, max_text_len=max_len)
    is_stage2 = "opt_proj.weight" in state or "t5_proj.weight" in state
    eos = "\n" if "opt_proj.weight" in state else ""  # OPT captions end with "\n" (LAVIS Blip2OPT)
    llm_cfg = LLMConfig(name=llm or "", eos_text=eos, max_text_len=max_len) if is_stage2 else LLMConfig()
    if guesses:
        warnings.warn(f"{path}: not in the file, guessed {'; '.join(guesses)}; state them in a model .yaml "
                      "(qformer_heads, vision_heads, max_text_len) if they differ", stacklevel=2)
    return ModelConfig(vision=vcfg, qformer=qcfg, llm=llm_cfg)


def _vision_config(state: dict[str, Tensor], path: Path, vision: str | None, heads: int | None,
                   guesses: list[str]) -> tuple[VisionConfig, int | None]:
    """The ViT's config from the file itself, eva_vit_g.pth or a BLIP-2 folder / hub id (which also gives the
    Q-Former's head count, returned second)."""
    if any(k.startswith("visual_encoder.transformer.") for k in state):
        raise UsageError(f"{path}: a CLIP ViT-L LAVIS checkpoint; only EVA ViT-g LAVIS files are supported so far")
    if any(k.startswith("visual_encoder.") for k in state):
        tower = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
        return _eva_config(tower, heads, guesses, path), None
    if vision and (Path(vision).is_dir() or not Path(vision).exists()):
        from transformers import Blip2Config

        src = Path(vision) if Path(vision).is_dir() else download(vision, fix="name a local `vision:` file or folder")
        reference = model_config_from_hf(Blip2Config.from_pretrained(src))
        if heads is not None and heads != reference.vision.heads:
            raise UsageError(f"vision_heads: {heads} contradicts {vision}'s {reference.vision.heads}")
        return reference.vision, reference.qformer.num_heads
    if vision:
        raw = safe_torch_load(Path(vision))
        return _eva_config(raw.get("model", raw) if isinstance(raw, dict) else {}, heads, guesses, Path(vision)), None
    return VisionConfig(), None


def _qformer_config(state: dict[str, Tensor], path: Path, heads: int | None, guesses: list[str]) -> QFormerConfig:
    def get(name: str) -> Tensor:
        if name not in state:
            raise UsageError(f"{path}: not a LAVIS BLIP-2 checkpoint (no {name})")
        return state[name]

    queries = get("query_tokens")
    if queries.dim() != 3:
        raise UsageError(f"{path}: query_tokens has shape {tuple(queries.shape)}, expected (1, queries, width)")
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.", k))})
    cross = [i for i in layers if f"Qformer.bert.encoder.layer.{i}.crossattention.self.query.weight" in state]
    words = state.get("Qformer.bert.embeddings.word_embeddings.weight")
    positions = state.get("Qformer.bert.embeddings.position_embeddings.weight")
    proj = state.get("vision_proj.weight")
    hidden = queries.shape[-1]
    if heads is None:
        heads = max(hidden // 64, 1)
        guesses.append(f"Q-Former heads {heads} (width {hidden} / 64, as BERT)")
    return QFormerConfig(
        num_queries=queries.shape[1], hidden_size=hidden, num_layers=len(layers), num_heads=heads,
        intermediate_size=get("Qformer.bert.encoder.layer.0.intermediate_query.dense.weight").shape[0],
        cross_attention_every=cross[1] - cross[0] if len(cross) > 1 else max(len(layers), 1), text=words is not None,
        vocab_size=words.shape[0] if words is not None else 30523,
        max_position_embeddings=positions.shape[0] if positions is not None else 512,
        embed_dim=proj.shape[0] if proj is not None else 256,
    )


def _eva_config(state: dict[str, Tensor], heads: int | None, guesses: list[str], path: Path) -> VisionConfig:
    """EVA ViT dims from its weights (eva_vit_g.pth or LAVIS visual_encoder.*); BLIP-2 keeps 39 of 40 blocks.
    The head count is not stored: `heads` when stated, else guessed (16 for ViT-g's 1408, else width / 64)."""
    try:
        width = state["cls_token"].shape[-1]
        blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        patch = state["patch_embed.proj.weight"].shape[-1]
        grid = int((state["pos_embed"].shape[1] - 1) ** 0.5)
        mlp = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError, AttributeError, TypeError):
        raise UsageError(f"{path}: not an EVA ViT state dict (expected cls_token, pos_embed, patch_embed, blocks.N)"
                         ) from None
    if heads is None:
        heads = 16 if width == 1408 else max(width // 64, 1)
        guesses.append(f"ViT heads {heads} ({'ViT-g' if width == 1408 else f'width {width} / 64'})")
    return VisionConfig(width=width, depth=39 if blocks == 40 else blocks, heads=heads, mlp_dim=mlp, patch_size=patch,
                        image_size=grid * patch, qkv_bias="blocks.0.attn.q_bias" in state)


@dataclass
class LavisModelFile:
    """What a model .yaml names (see the module docstring)."""

    checkpoint: str
    vision: str | None = None
    llm: str | None = None
    tokenizer: str = "bert-base-uncased"
    qformer_heads: int | None = None
    vision_heads: int | None = None
    max_text_len: int | None = None
    image_size: int | None = None

    def __post_init__(self) -> None:
        for key in ("qformer_heads", "vision_heads", "max_text_len", "image_size"):
            value = getattr(self, key)
            if value is not None and not 1 <= value <= 65536:
                raise UsageError(f"{key}: expected a positive integer, got {value}")

    @property
    def architecture(self) -> Architecture:
        return Architecture(self.qformer_heads, self.vision_heads, self.max_text_len, self.image_size)


def read_model_file(path: Path) -> LavisModelFile:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({_first(exc)})") from None
    spec = from_dict(LavisModelFile, raw, path.name)
    here = path.parent

    def local(value: str | None) -> str | None:  # paths are relative to the model file; hub ids stay as they are
        return str(here / value) if value and (here / value).exists() else value

    checkpoint = Path(local(spec.checkpoint))
    if not checkpoint.is_file():
        raise UsageError(f"{path}: checkpoint {spec.checkpoint!r} not found")
    return replace(spec, checkpoint=str(checkpoint), vision=local(spec.vision), llm=local(spec.llm),
                   tokenizer=local(spec.tokenizer) or spec.tokenizer)


def _first(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0]
