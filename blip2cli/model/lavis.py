"""LAVIS `.pth` checkpoints: partial state dicts under "model" (spec §9.1), their config read from the shapes.

Files without a ViT, and stage-2 files, need their other parts named. From the command line that is a small YAML
model file given to `--model`:

    checkpoint: blip2_pretrained_opt2.7b.pth   # relative to this file
    vision: Salesforce/blip2-opt-2.7b          # eva_vit_g.pth, or a BLIP-2 folder / hub id whose ViT is the same
    llm: facebook/opt-2.7b
    tokenizer: bert-base-uncased               # the Q-Former's (stage-1 files only)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from torch import Tensor

from blip2cli.config import LLMConfig, ModelConfig, QFormerConfig, VisionConfig, from_dict
from blip2cli.errors import UsageError
from blip2cli.model.blip2 import Blip2
from blip2cli.model.load import _fingerprint, build_model, download, fill, finish, model_config_from_hf
from blip2cli.model.names import DROPPED, lavis_to_ours
from blip2cli.model.placement import placement
from blip2cli.model.weights import safe_torch_load


def load_lavis(path: Path, place_args: tuple[str, ...], name: str, vision: str | None, llm: str | None,
               tokenizer: str = "bert-base-uncased") -> Blip2:
    """LAVIS checkpoints are partial state dicts under "model" (spec §9.1). Stage-1 files keep the ITG head and
    temperature; the ViT comes from the file (fine-tuned ones) or from `vision`; the LLM from `llm`."""
    raw = safe_torch_load(path)
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or "query_tokens" not in state:
        raise UsageError(f"{path}: not a LAVIS BLIP-2 checkpoint (no query_tokens)")
    has_vision = any(k.startswith("visual_encoder.") for k in state)
    if not has_vision and not vision:
        raise UsageError(f"{path} has no vision weights: give --model a model .yaml naming `checkpoint` and `vision` "
                         "(eva_vit_g.pth, or a BLIP-2 hub id such as Salesforce/blip2-itm-vit-g whose ViT is the same)")
    cfg = _lavis_config(state, path, llm, vision)
    if ("opt_proj.weight" in state or "t5_proj.weight" in state) and not llm:
        raise UsageError(f"{path} is a stage-2 checkpoint: give --model a model .yaml naming `checkpoint`, `vision` "
                         "and its frozen `llm` (e.g. facebook/opt-2.7b)")
    cfg = replace(cfg, vision=replace(cfg.vision, weights="" if has_vision else str(vision)),
                  qformer=replace(cfg.qformer, tokenizer=tokenizer))
    model = build_model(cfg, place_args, initialize=False)
    place = placement(*place_args, t5=model.llm is not None and model.llm.is_encoder_decoder)
    ours = ((lavis_to_ours(n), t) for n, t in state.items())
    expected_missing = ("vision.",) if not has_vision else ()
    fill(model, ((n, t) for n, t in ours if n is not None and not DROPPED.search(n)), place,
         allow_missing=expected_missing + ("llm.",), strict=True, source=str(path))
    return finish(model, place, name, _fingerprint([path]))


def _lavis_config(state: dict[str, Tensor], path: Path, llm: str | None, vision: str | None) -> ModelConfig:
    """Shapes in a LAVIS file -> ModelConfig. Head counts are not stored: taken from the BLIP-2 directory named
    as `vision` when there is one, else 64-wide heads as in BERT (12 for 768) and 16 for ViT-g (head dim 88)."""
    if any(k.startswith("visual_encoder.transformer.") for k in state):
        raise UsageError(f"{path}: a CLIP ViT-L LAVIS checkpoint; only EVA ViT-g LAVIS files are supported so far")
    heads = None
    if any(k.startswith("visual_encoder.") for k in state):
        vcfg = _eva_config({k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")})
    elif vision and (Path(vision).is_dir() or not Path(vision).exists()):
        from transformers import Blip2Config

        src = Path(vision) if Path(vision).is_dir() else download(vision)
        reference = model_config_from_hf(Blip2Config.from_pretrained(src))
        vcfg, heads = reference.vision, reference.qformer.num_heads
    elif vision:
        raw = safe_torch_load(Path(vision))
        vcfg = _eva_config(raw.get("model", raw))
    else:
        vcfg = VisionConfig()
    vcfg = replace(vcfg, ln_vision_eps=1e-5)  # LAVIS's ln_vision (spec §2.1)
    queries = state["query_tokens"]
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"Qformer\.bert\.encoder\.layer\.(\d+)\.", k))})
    cross = [i for i in layers if f"Qformer.bert.encoder.layer.{i}.crossattention.self.query.weight" in state]
    words = state.get("Qformer.bert.embeddings.word_embeddings.weight")
    positions = state.get("Qformer.bert.embeddings.position_embeddings.weight")
    proj = state.get("vision_proj.weight")
    hidden = queries.shape[-1]
    qcfg = QFormerConfig(
        num_queries=queries.shape[1], hidden_size=hidden, num_layers=len(layers),
        num_heads=heads or max(hidden // 64, 1),
        intermediate_size=state["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        cross_attention_every=cross[1] - cross[0] if len(cross) > 1 else max(len(layers), 1), text=words is not None,
        vocab_size=words.shape[0] if words is not None else 30523,
        max_position_embeddings=positions.shape[0] if positions is not None else 512,
        embed_dim=proj.shape[0] if proj is not None else 256,
    )
    is_stage2 = "opt_proj.weight" in state or "t5_proj.weight" in state
    eos = "\n" if "opt_proj.weight" in state else ""  # OPT captions end with "\n" (spec §5.2)
    llm_cfg = LLMConfig(name=llm or "", eos_text=eos) if is_stage2 else LLMConfig()
    return ModelConfig(vision=vcfg, qformer=qcfg, llm=llm_cfg)


def _eva_config(state: dict[str, Tensor]) -> VisionConfig:
    """EVA ViT dims from its weights (eva_vit_g.pth or LAVIS visual_encoder.*); BLIP-2 keeps 39 of 40 blocks."""
    width = state["cls_token"].shape[-1]
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = int((state["pos_embed"].shape[1] - 1) ** 0.5)
    return VisionConfig(width=width, depth=39 if blocks == 40 else blocks, heads=16 if width == 1408 else width // 64,
                        mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0], patch_size=patch, image_size=grid * patch,
                        qkv_bias="blocks.0.attn.q_bias" in state)


@dataclass
class LavisModelFile:
    """What a model .yaml names (see the module docstring)."""

    checkpoint: str
    vision: str | None = None
    llm: str | None = None
    tokenizer: str = "bert-base-uncased"


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
    return LavisModelFile(str(checkpoint), local(spec.vision), local(spec.llm), local(spec.tokenizer) or spec.tokenizer)


def _first(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0]
