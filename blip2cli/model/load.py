"""`--model` -> Blip2. Accepts a Hugging Face hub id, a local directory in Hugging Face BLIP-2 format, a directory
written by `blip2 pretrain/finetune`, or a LAVIS `.pth` (with the vision weights and LLM named alongside).

The model is built on the meta device and every weight is assigned from a memory-mapped file, cast to its
component's dtype on the way, so loading never holds two copies of the weights. Weight names are translated
with plain prefix tables (spec §9.2).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from blip2cli.config import LLMConfig, ModelConfig, QFormerConfig, VisionConfig, model_config_from_yaml
from blip2cli.errors import UsageError
from blip2cli.model.blip2 import Blip2
from blip2cli.model.llm import FrozenLLM
from blip2cli.model.vision import interpolate_pos_embed
from blip2cli.model.weights import checkpoint_files, iter_tensors, read_safetensors, safe_torch_load

KNOWN_HUB_IDS = (
    "Salesforce/blip2-opt-2.7b", "Salesforce/blip2-opt-6.7b", "Salesforce/blip2-opt-2.7b-coco",
    "Salesforce/blip2-opt-6.7b-coco", "Salesforce/blip2-flan-t5-xl", "Salesforce/blip2-flan-t5-xl-coco",
    "Salesforce/blip2-flan-t5-xxl", "Salesforce/blip2-itm-vit-g", "Salesforce/blip2-itm-vit-g-coco",
)
SIDECAR = "blip2cli_extra.safetensors"  # written by export.py: temp and Qformer.cls.* (our names)
RUN_WEIGHTS = "model.safetensors"  # trainable weights of a training output, beside recipe.yaml
RUN_RECIPE = "recipe.yaml"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
LLM_TOKENIZER_DIR = "llm_tokenizer"

# ---------------------------------------------------------------------------------------------------------------
# Weight-name tables: (source prefix, our prefix), first match wins. Ours follow LAVIS without `Qformer.bert`.

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
HF_QFORMER_TO_OURS = ((".attention.attention.", ".attention.self."), (".crossattention.attention.", ".crossattention.self."))

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


def ours_to_lavis(name: str, llm_family: str = "opt") -> str | None:
    inverse = tuple((dst, src) for src, dst in LAVIS_TO_OURS if src != ("t5_proj." if llm_family == "opt" else "opt_proj."))
    if name.startswith("llm.") or name.endswith(".k_bias"):
        return None
    return _rename(name, inverse)


def split_qkv_biases(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF's fused qkv bias -> q_bias, k_bias, v_bias thirds (ours keeps k as a fixed buffer, spec §9.2)."""
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
    import warnings

    warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# Devices and precision


@dataclass(frozen=True)
class Placement:
    device: torch.device
    vision: torch.dtype  # frozen image tower
    llm: torch.dtype  # frozen language model
    # The Q-Former, query tokens, ln_vision and projections always stay fp32 (spec §5.5).


def placement(device: str = "auto", dtype: str = "auto", t5: bool = False) -> Placement:
    """Accelerate picks the device for "auto". Frozen towers: bf16 on GPUs that have it (else fp16), fp32 on
    CPU (no fp16 LayerNorm there, spec §5.5). Flan-T5 is never fp16 (NaNs, transformers #23918)."""
    if device == "auto":
        from accelerate import PartialState

        dev = PartialState().device
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device: unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available on this machine")
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        if dev.type == "cuda":
            tower = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            tower = torch.float32
    elif dtype in names:
        tower = names[dtype]
    else:
        raise UsageError(f"--dtype: expected auto, float32, float16 or bfloat16, got {dtype!r}")
    llm = tower
    if t5 and tower == torch.float16:
        llm = torch.bfloat16 if dev.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float32
        _warn("Flan-T5 does not run in float16 (it overflows): using " + str(llm).replace("torch.", ""))
    return Placement(dev, tower, llm)


def _target_dtype(name: str, tensor: Tensor, place: Placement) -> torch.dtype:
    if not tensor.is_floating_point():
        return tensor.dtype
    if name.startswith("vision.tower."):
        if re.search(r"\.norm\d\.", name):  # LayerNorms of the frozen tower stay fp32 (spec §2.1)
            return torch.float32
        return place.vision
    if name.startswith("llm.model."):
        return place.llm
    return torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Building and filling the model


def build_empty(cfg: ModelConfig, llm_config=None, llm_tokenizer=None, tokenizer=None) -> Blip2:
    """The model with parameters on the meta device (no memory) and real buffers."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        llm = None
        if llm_config is not None:
            from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

            auto = AutoModelForSeq2SeqLM if llm_config.is_encoder_decoder else AutoModelForCausalLM
            lm = auto.from_config(llm_config)
            llm = FrozenLLM(lm, llm_tokenizer, cfg.llm.eos_text, cfg.llm.max_text_len)
        return Blip2(cfg, llm, tokenizer)


def fill(model: Blip2, tensors: Iterable[tuple[str, Tensor]], place: Placement, *, allow_missing: Iterable[str] = (),
         strict: bool = True, source: str = "") -> list[str]:
    """Assign `tensors` (our names) to the model, cast per component. Returns the names that were filled.
    Unexpected names are an error under `strict`; missing ones are an error unless a prefix in `allow_missing`."""
    expected = dict(model.state_dict(keep_vars=True))
    state, unexpected = {}, []
    for name, tensor in tensors:
        if name not in expected:
            unexpected.append(name)
            continue
        target = expected[name]
        if name == "vision.tower.pos_embed" and tensor.shape != target.shape:
            tensor = interpolate_pos_embed(tensor, target.shape[1])  # 224 -> 364/490 px (spec §2.1)
        if tuple(tensor.shape) != tuple(target.shape):
            raise UsageError(f"{source}: weight {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(target.shape)}: the checkpoint does not match its config")
        state[name] = tensor.to(_target_dtype(name, tensor, place))
    if unexpected and strict:
        raise UsageError(f"{source}: unexpected weights: {_few(unexpected)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.qformer.tie_weights()
    if model.llm is not None:
        model.llm.model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(tuple(allow_missing))]
    if missing:
        raise UsageError(f"{source}: missing weights: {_few(missing)}")
    return list(state)


def _few(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def materialize(model: Blip2) -> list[str]:
    """Give parameters still on the meta device fresh initial values (heads a checkpoint has no place for, or
    the trainable parts of a model about to be trained)."""
    fresh = []
    for module_name, module in model.named_modules():
        for n, p in list(module.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            value = torch.empty(p.shape, dtype=p.dtype)
            if n == "temp":
                value.fill_(0.07)  # spec §3.4
            elif isinstance(module, torch.nn.LayerNorm):
                value.fill_(1.0 if n == "weight" else 0.0)
            elif n == "bias" or n.endswith("_bias"):
                value.zero_()
            else:
                torch.nn.init.normal_(value, std=0.02)
            setattr(module, n, torch.nn.Parameter(value, requires_grad=p.requires_grad))
            fresh.append(f"{module_name}.{n}" if module_name else n)
    model.qformer.tie_weights()
    return fresh


def finish(model: Blip2, place: Placement, name: str, fingerprint: str) -> Blip2:
    model.to(place.device)
    model.eval()
    model.name, model.fingerprint = name, fingerprint
    return model


def _fingerprint(files: Iterable[Path]) -> str:
    """Cheap identity of a checkpoint: names, sizes and mtimes of its files, and the head of each."""
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face format


def model_config_from_hf(hf) -> ModelConfig:
    """Blip2Config -> ModelConfig. Retrieval checkpoints keep the text half of the Q-Former."""
    v, q = hf.vision_config, hf.qformer_config
    arch = (hf.architectures or ["Blip2ForConditionalGeneration"])[0]
    text = bool(q.use_qformer_text_input) or "Retrieval" in arch or "WithProjection" in arch
    vision = VisionConfig(
        image_size=_int(v.image_size), patch_size=_int(v.patch_size), width=v.hidden_size, depth=v.num_hidden_layers,
        heads=v.num_attention_heads, mlp_dim=v.intermediate_size, layer_norm_eps=v.layer_norm_eps,
        ln_vision_eps=v.layer_norm_eps, qkv_bias=v.qkv_bias,
    )
    qformer = QFormerConfig(
        num_queries=hf.num_query_tokens, hidden_size=q.hidden_size, num_layers=q.num_hidden_layers,
        num_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
        cross_attention_every=q.cross_attention_frequency, vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
        dropout=q.hidden_dropout_prob, attention_dropout=q.attention_probs_dropout_prob,
        embed_dim=hf.image_text_hidden_size, text=text,
    )
    llm = LLMConfig()
    if "Retrieval" not in arch and "WithProjection" not in arch and getattr(hf, "text_config", None) is not None:
        llm = LLMConfig(name="(in checkpoint)", eos_text="\n" if hf.text_config.model_type == "opt" else "")
    return ModelConfig(vision=vision, qformer=qformer, llm=llm)


def _int(x) -> int:
    return int(x[0] if isinstance(x, (list, tuple)) else x)


def _is_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "blip-2"
    except (json.JSONDecodeError, OSError):
        return False


def load_hf_dir(path: Path, place_args: tuple[str, str], name: str) -> Blip2:
    from transformers import AutoTokenizer, Blip2Config

    hf = Blip2Config.from_pretrained(path)
    cfg = model_config_from_hf(hf)
    files = checkpoint_files(path)
    if not files:
        raise UsageError(f"{path}: a BLIP-2 config but no weights (model.safetensors or pytorch_model.bin)")
    place = placement(*place_args, t5=cfg.llm.enabled and hf.text_config.is_encoder_decoder)
    llm_tok = q_tok = None
    if cfg.llm.enabled:
        llm_tok = AutoTokenizer.from_pretrained(path)
    if cfg.qformer.text:
        q_tok = qformer_tokenizer(path)
    model = build_empty(cfg, hf.text_config if cfg.llm.enabled else None, llm_tok, q_tok)
    tensors = [(hf_to_ours(n), t) for n, t in _split_biases(iter_tensors(files))]
    sidecar = path / SIDECAR
    if sidecar.is_file():  # temp and the ITG head of a model exported by us (HF has no place for them)
        tensors += list(read_safetensors(sidecar).items())
    allow = ("temp", "qformer.cls.") if cfg.qformer.text else ()
    fill(model, ((n, t) for n, t in tensors if n is not None and not DROPPED.search(n)), place,
         allow_missing=allow, source=str(path))
    fresh = materialize(model)
    if fresh:
        _warn("this Hugging Face checkpoint has no ITG head or temperature (HF has no place for them): "
              "temp = 0.07 and a fresh ITG head, fine for retrieval, not for ITG or Q-Former captions")
    return finish(model, place, name, _fingerprint(files))


def _split_biases(items: Iterable[tuple[str, Tensor]]) -> Iterable[tuple[str, Tensor]]:
    for name, tensor in items:
        if name.endswith("self_attn.qkv.bias"):
            yield from split_qkv_biases({name.replace("self_attn.qkv.bias", "attn.qkv.bias"): tensor}).items()
        else:
            yield name, tensor


def qformer_tokenizer(source: str | Path):
    """BERT tokenizer with [DEC] as bos_token (spec §3.2). `source`: hub id or directory (its `qformer_tokenizer/`
    subfolder when present)."""
    from transformers import AutoTokenizer

    src = Path(source)
    if (src / QFORMER_TOKENIZER_DIR).is_dir():
        src = src / QFORMER_TOKENIZER_DIR
    try:
        tok = AutoTokenizer.from_pretrained(str(src) if src.exists() else str(source), truncation_side="right")
    except OSError as exc:
        raise UsageError(f"cannot load the Q-Former tokenizer from {source}: {_first_line(exc)}") from None
    if tok.bos_token is None or tok.bos_token != "[DEC]":
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Hub ids


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not name.startswith((".", "/"))


def download(repo_id: str) -> Path:
    """Snapshot a hub repo into the standard cache (progress bars from huggingface_hub); honours HF_HUB_OFFLINE.
    safetensors are preferred; .bin weights are fetched only for repos without them."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not checkpoint_files(directory):
            directory = Path(snapshot_download(repo_id, allow_patterns=patterns + ["*.bin"]))
        return directory
    except RepositoryNotFoundError:
        known = "\n  ".join(KNOWN_HUB_IDS)
        raise UsageError(f"unknown model {repo_id!r}: not a local path and not on the Hugging Face hub. "
                         f"Official BLIP-2 models:\n  {known}") from None
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        known = "" if repo_id in KNOWN_HUB_IDS else " Official BLIP-2 models: " + ", ".join(KNOWN_HUB_IDS) + "."
        raise UsageError(f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached{offline}. "
                         f"Download it once online (`hf download {repo_id}`) or pass a local directory.{known}") from None


# ---------------------------------------------------------------------------------------------------------------
# Training outputs (recipe.yaml + trainable weights)


def _is_run_dir(path: Path) -> bool:
    return (path / RUN_RECIPE).is_file() and (path / RUN_WEIGHTS).is_file()


def load_run_dir(path: Path, place_args: tuple[str, str], name: str) -> Blip2:
    """A `blip2 pretrain/finetune` output: the recipe says how to rebuild the frozen parts."""
    cfg = model_config_from_yaml(path / RUN_RECIPE)
    trained = read_safetensors(path / RUN_WEIGHTS)
    model = build_model(cfg, place_args, tokenizer_source=path, initialize=False)
    place = placement(*place_args, t5=_is_t5(model))
    fill(model, trained.items(), place, allow_missing=(), strict=True, source=str(path))
    return finish(model, place, name, _fingerprint([path / RUN_WEIGHTS]))


def _is_t5(model: Blip2) -> bool:
    return model.llm is not None and model.llm.is_encoder_decoder


def build_model(cfg: ModelConfig, place_args: tuple[str, str] = ("auto", "auto"),
                tokenizer_source: str | Path | None = None, initialize: bool = True) -> Blip2:
    """A model from its config: frozen LLM and vision weights from their named sources. With `initialize`, the
    rest gets fresh initial values (training); without, it stays on the meta device for a checkpoint to fill,
    so anything the checkpoint lacks is reported as missing."""
    llm_config = llm_tok = None
    if cfg.llm.enabled:
        from transformers import AutoConfig, AutoTokenizer

        src = cfg.llm.name
        tok_src = Path(tokenizer_source) / LLM_TOKENIZER_DIR if tokenizer_source else None
        llm_tok = AutoTokenizer.from_pretrained(str(tok_src) if tok_src and tok_src.is_dir() else src)
        llm_config = AutoConfig.from_pretrained(src)
    q_tok = None
    if cfg.qformer.text:
        q_tok = qformer_tokenizer(tokenizer_source if tokenizer_source and
                                  (Path(tokenizer_source) / QFORMER_TOKENIZER_DIR).is_dir() else cfg.qformer.tokenizer)
    model = build_empty(cfg, llm_config, llm_tok, q_tok)
    place = placement(*place_args, t5=bool(llm_config is not None and llm_config.is_encoder_decoder))
    if llm_config is not None:
        fill(model, _llm_weights(cfg.llm.name), place, allow_missing=("vision.", "ln_vision", "query_tokens",
             "qformer.", "vision_proj", "text_proj", "itm_head", "temp", "llm_proj"), strict=False, source=cfg.llm.name)
    if cfg.vision.weights and cfg.vision.kind == "eva":
        fill(model, vision_weights(cfg.vision.weights), place, allow_missing=("",), strict=False,
             source=cfg.vision.weights)
    if initialize and cfg.qformer.init_from:
        fill(model, bert_weights(cfg.qformer.init_from, cfg.qformer.vocab_size), place, allow_missing=("",),
             strict=False, source=cfg.qformer.init_from)
    if initialize:
        materialize(model)  # whatever no source provided: trainable parts, or the tower when it is random
    return model


def bert_weights(source: str, vocab_size: int) -> Iterable[tuple[str, Tensor]]:
    """The Q-Former's starting point, as LAVIS builds it (spec §3.1-3.2): BERT's embeddings, self-attention and
    FFN, the FFN copied into the query FFN, BERT's MLM head as the ITG head, the vocabulary grown for [DEC]
    (new rows: the mean embedding). Cross-attention stays randomly initialised."""
    path = Path(source)
    directory = path if path.is_dir() else download(source)
    files = checkpoint_files(directory)
    if not files:
        raise UsageError(f"model.qformer.init_from: no BERT weights in {directory}")
    for name, tensor in iter_tensors(files):
        name = name.removeprefix("bert.")
        if name.startswith("cls.predictions.") and not name.endswith("decoder.weight"):
            ours = "qformer." + name
        elif name.startswith(("embeddings.word_embeddings.", "embeddings.position_embeddings.",
                              "embeddings.LayerNorm.", "encoder.layer.")):
            ours = "qformer." + name
        else:
            continue  # pooler, token types, decoder (tied)
        if ours.endswith(("word_embeddings.weight", "predictions.bias")) and tensor.shape[0] < vocab_size:
            extra = tensor.mean(0, keepdim=True).expand(vocab_size - tensor.shape[0], *tensor.shape[1:])
            tensor = torch.cat((tensor, extra))
        yield ours, tensor
        for text_ffn in (".intermediate.", ".output."):  # queries start from a copy of BERT's FFN
            if text_ffn in ours and ".attention." not in ours:
                yield ours.replace(text_ffn, text_ffn[:-1] + "_query."), tensor


def _llm_weights(name: str) -> Iterable[tuple[str, Tensor]]:
    path = Path(name)
    directory = path if path.is_dir() else (download(name) if _looks_like_hub_id(name) else None)
    if directory is None:
        raise UsageError(f"model.llm.name: {name!r} is neither a directory nor a hub id")
    files = checkpoint_files(directory)
    if not files:
        raise UsageError(f"{directory}: no LLM weights found")
    return (("llm.model." + n, t) for n, t in iter_tensors(files))


def vision_weights(source: str) -> Iterable[tuple[str, Tensor]]:
    """Vision tower (+ ln_vision when present) from eva_vit_g.pth, a LAVIS file with visual_encoder.*, or a HF
    BLIP-2 directory / hub id (its vision_model.*)."""
    path = Path(source).expanduser()
    if path.is_file():
        state = safe_torch_load(path)
        state = state.get("model", state) if isinstance(state, dict) else state
        for n, t in state.items():
            if n.startswith("visual_encoder.") or n == "ln_vision.weight" or n == "ln_vision.bias":
                yield lavis_to_ours(n), t
            elif not n.startswith(("head.", "norm.", "fc_norm.", "rope")) and "." in n or n in ("cls_token", "pos_embed"):
                yield "vision.tower." + n, t  # raw EVA file (eva_vit_g.pth); block 39 is ignored below
        return
    directory = path if path.is_dir() else download(source)
    for n, t in _split_biases(iter_tensors(checkpoint_files(directory))):
        if n.startswith("vision_model."):
            yield hf_to_ours(n), t


# ---------------------------------------------------------------------------------------------------------------
# LAVIS .pth


def load_lavis(path: Path, place_args: tuple[str, str], name: str, vision: str | None, llm: str | None,
               tokenizer: str = "bert-base-uncased") -> Blip2:
    """LAVIS checkpoints are partial state dicts under "model" (spec §9.1). Stage-1 files keep the ITG head and
    temperature; the ViT comes from the file (fine-tuned ones) or from `vision`; the LLM from `llm`."""
    raw = safe_torch_load(path)
    state = raw.get("model", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or "query_tokens" not in state:
        raise UsageError(f"{path}: not a LAVIS BLIP-2 checkpoint (no query_tokens)")
    has_vision = any(k.startswith("visual_encoder.") for k in state)
    if not has_vision and not vision:
        raise UsageError(f"{path} has no vision weights: name them with --vision (eva_vit_g.pth, or a BLIP-2 hub id "
                         "such as Salesforce/blip2-itm-vit-g whose ViT is the same)")
    cfg = _lavis_config(state, path, llm, vision)
    if cfg.llm.enabled and not llm:
        raise UsageError(f"{path} is a stage-2 checkpoint: name its frozen LLM with --llm (e.g. facebook/opt-2.7b)")
    cfg = replace(cfg, vision=replace(cfg.vision, weights="" if has_vision else str(vision)),
                  qformer=replace(cfg.qformer, tokenizer=tokenizer))
    model = build_model(cfg, place_args, initialize=False)
    place = placement(*place_args, t5=_is_t5(model))
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
        num_queries=queries.shape[1], hidden_size=hidden, num_layers=len(layers), num_heads=heads or max(hidden // 64, 1),
        intermediate_size=state["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
        cross_attention_every=cross[1] - cross[0] if len(cross) > 1 else max(len(layers), 1), text=words is not None,
        vocab_size=words.shape[0] if words is not None else 30523,
        max_position_embeddings=positions.shape[0] if positions is not None else 512,
        embed_dim=proj.shape[0] if proj is not None else 256,
    )
    is_stage2 = "opt_proj.weight" in state or "t5_proj.weight" in state
    llm_cfg = LLMConfig(name=llm or "", eos_text="\n" if "opt_proj.weight" in state else "") if is_stage2 else LLMConfig()
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


# ---------------------------------------------------------------------------------------------------------------
# The entry point


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto", *, vision: str | None = None,
               llm: str | None = None) -> Blip2:
    """Everything `--model` accepts -> a ready Blip2 in eval mode on its device."""
    path = Path(name_or_path).expanduser()
    args = (device, dtype)
    if path.is_dir():
        if _is_run_dir(path):
            return load_run_dir(path, args, name_or_path)
        if _is_hf_dir(path):
            return load_hf_dir(path, args, name_or_path)
        if (path / "final").is_dir():
            return load_model(str(path / "final"), device, dtype, vision=vision, llm=llm)
        raise UsageError(f"{path}: not a BLIP-2 checkpoint (expected a Hugging Face BLIP-2 config.json, "
                         f"or {RUN_RECIPE} + {RUN_WEIGHTS} from blip2 pretrain/finetune)")
    if path.is_file():
        if path.suffix in (".pth", ".pt", ".bin"):
            return load_lavis(path, args, name_or_path, vision, llm)
        raise UsageError(f"{path}: not a checkpoint file (expected a LAVIS .pth, or a model directory)")
    if _looks_like_hub_id(name_or_path):
        return load_hf_dir(download(name_or_path), args, name_or_path)
    raise UsageError(f"no such model: {name_or_path!r} (not a file, a folder or a hub id)")
