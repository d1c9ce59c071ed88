"""`--model` -> Blip2. Accepts a Hugging Face hub id, a local directory in Hugging Face BLIP-2 format, a directory
written by `blip2 pretrain/finetune`, or a LAVIS `.pth` (with the vision weights and LLM named alongside).

The model is built on the meta device and every weight is assigned from a memory-mapped file, cast to its
component's dtype on the way, so loading never holds two copies of the weights. Weight names are translated
with plain prefix tables (HF's conversion script).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from blip2cli.config import ModelConfig, model_config_from_yaml
from blip2cli.errors import UsageError
from blip2cli.model import int8_linear, packed, quantize
from blip2cli.model.blip2 import Blip2
from blip2cli.model.llm import FrozenLLM
from blip2cli.model.names import DROPPED, hf_to_ours, lavis_to_ours, split_qkv_biases
from blip2cli.model.placement import Placement, _target_dtype, placement
from blip2cli.model.sizes import check_fits
from blip2cli.model.vision import interpolate_pos_embed
from blip2cli.model.hf_config import model_config_from_hf
from blip2cli.model.hub import download, looks_like_hub_id, pretrained
from blip2cli.model.lavis import Architecture, read_lavis, read_model_file
from blip2cli.model.weights import checkpoint_files, iter_tensors, read_safetensors, release_pages, safe_torch_load

SIDECAR = "blip2cli_extra.safetensors"  # written by export.py: temp and Qformer.cls.* (our names)
RUN_WEIGHTS = "model.safetensors"  # trainable weights of a training output, beside recipe.yaml
RUN_RECIPE = "recipe.yaml"
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
LLM_TOKENIZER_DIR = "llm_tokenizer"
# What to do when a source a recipe (or a model .yaml) names is neither cached nor reachable
TOKENIZER_FIX = "--set model.qformer.tokenizer=DIR (any BERT tokenizer folder; `tokenizer:` in a model .yaml)"
LLM_FIX = "--set model.llm.name=DIR (a local folder of the LLM; `llm:` in a model .yaml)"
VISION_FIX = "--set model.vision.weights=FILE (a local file; `vision:` in a model .yaml)"

# ---------------------------------------------------------------------------------------------------------------
# Building and filling the model


def build_empty(cfg: ModelConfig, llm_config=None, llm_tokenizer=None, tokenizer=None, source: str = "") -> Blip2:
    """The model with parameters on the meta device (no memory) and real buffers, once its sizes are known to fit."""
    from accelerate import init_empty_weights

    try:
        check_fits(cfg, llm_config)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}" if source else str(exc)) from None

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
    modules = dict(model.named_modules())
    state, unexpected, quantized = {}, [], []
    for name, tensor in tensors:
        if name not in expected:
            unexpected.append(name)
            continue
        target = expected[name]
        if name == "vision.tower.pos_embed" and tensor.shape != target.shape:
            tensor = interpolate_pos_embed(tensor, target.shape[1])  # 224 -> 364/490 px (LAVIS eva_vit)
        if tuple(tensor.shape) != tuple(target.shape):
            raise UsageError(f"{source}: weight {name} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(target.shape)}: the checkpoint does not match its config")
        value = tensor.to(_target_dtype(name, tensor, place))
        if _quantize_weight(model, modules, name, value, place):
            release_pages(tensor)  # this layer now lives in int8/int4: its fp32 pages can go
            quantized.append(name)
            continue
        state[name] = value
    if unexpected and strict:
        raise UsageError(f"{source}: unexpected weights: {_few(unexpected)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.qformer.tie_weights()
    if model.llm is not None:
        model.llm.model.tie_weights()
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()]
               if p.is_meta and not n.startswith(tuple(allow_missing))]  # buffers: int8_linear's biases
    if missing:
        raise UsageError(f"{source}: missing weights: {_few(missing)}")
    return list(state) + quantized


def _quantize_weight(model: Blip2, modules: dict[str, torch.nn.Module], name: str, value: Tensor,
                     place: Placement) -> bool:
    """Quantize a frozen tower's linear layer the moment its weight arrives (one layer in full precision at a
    time, never the whole model). False: not a layer to quantize, assign it as usual."""
    owner = name.removesuffix(".weight")
    module = modules.get(owner)
    if place.quantize == "none" or owner == name or module is None or not quantize.is_quantized_linear(owner, module):
        return False
    if not owner.startswith(quantize.frozen_prefixes(model.cfg.vision.freeze)):
        return False
    parent, _, child = owner.rpartition(".")
    if place.inference and place.quantize == "int8" and place.backend == "torchao" and int8_linear.available():
        # a model loaded to run: int8 values straight into fbgemm's int8 x int8 product (model/int8_linear.py)
        modules[owner] = int8_linear.from_weight(value, module.bias)  # a meta bias: load_state_dict assigns it
        setattr(modules[parent], child, modules[owner])
        return True
    module.weight = torch.nn.Parameter(value, requires_grad=False)
    int8_compute = owner.startswith("vision.tower.")  # many rows per matmul, never a gradient through it
    quantize.quantize_linear(modules[parent], child, module, place.quantize, place.device, int8_compute,
                             place.backend)
    return True


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
                value.fill_(0.07)  # LAVIS Blip2Qformer
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
    model.quantize = place.quantize
    if model.llm is not None:  # loaded for inference: decoding may pack the LLM's linears (model/packed.py)
        model.llm.pack_for_decoding = packed.available(place.device)
    # quantized weights give other vectors: an index records it (retrieval/store.py refuses mixing)
    model.name, model.fingerprint = name, fingerprint + ("" if place.quantize == "none" else f":{place.quantize}")
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


def _is_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "blip-2"
    except (json.JSONDecodeError, OSError):
        return False


def load_hf_dir(path: Path, place_args: tuple[str, ...], name: str) -> Blip2:
    from transformers import AutoTokenizer, Blip2Config

    try:
        hf = Blip2Config.from_pretrained(path)
        cfg = model_config_from_hf(hf)
    except UsageError as exc:
        raise UsageError(f"{path / 'config.json'}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - transformers' own validation errors have no common base
        raise UsageError(f"{path / 'config.json'}: not a valid BLIP-2 config ({_first_line(exc)})") from None
    files = checkpoint_files(path)
    if not files:
        raise UsageError(f"{path}: a BLIP-2 config but no weights (model.safetensors or pytorch_model.bin)")
    place = placement(*place_args, t5=cfg.llm.enabled and hf.text_config.is_encoder_decoder)
    llm_tok = q_tok = None
    if cfg.llm.enabled:
        llm_tok = AutoTokenizer.from_pretrained(path)
    if cfg.qformer.text:
        q_tok = qformer_tokenizer(path)
    model = build_empty(cfg, hf.text_config if cfg.llm.enabled else None, llm_tok, q_tok,
                        source=str(path / "config.json"))
    tensors = [(hf_to_ours(n), t) for n, t in _split_biases(iter_tensors(files))]
    sidecar = path / SIDECAR
    if sidecar.is_file():  # temp and the ITG head of a model exported by us (HF has no place for them)
        tensors += list(read_safetensors(sidecar).items())
    allow = ("temp", "qformer.cls.") if cfg.qformer.text else ()
    fill(model, ((n, t) for n, t in tensors if n is not None and not DROPPED.search(n)), place,
         allow_missing=allow, source=str(path))
    model.fresh_itg_head = bool(materialize(model))  # HF has no place for temp and the ITG head: warned on use
    return finish(model, place, name, _fingerprint(files))


def _split_biases(items: Iterable[tuple[str, Tensor]]) -> Iterable[tuple[str, Tensor]]:
    for name, tensor in items:
        if name.endswith("self_attn.qkv.bias"):
            yield from split_qkv_biases({name.replace("self_attn.qkv.bias", "attn.qkv.bias"): tensor}).items()
        else:
            yield name, tensor


def qformer_tokenizer(source: str | Path):
    """BERT tokenizer with [DEC] as bos_token (LAVIS Qformer). `source`: hub id or directory (its `qformer_tokenizer/`
    subfolder when present)."""
    from transformers import AutoTokenizer

    src = Path(source)
    if (src / QFORMER_TOKENIZER_DIR).is_dir():
        src = src / QFORMER_TOKENIZER_DIR
    try:
        tok = pretrained(AutoTokenizer.from_pretrained, src if src.exists() else str(source), TOKENIZER_FIX,
                         truncation_side="right")
    except OSError as exc:
        raise UsageError(f"cannot load the Q-Former tokenizer from {source}: {_first_line(exc)}") from None
    if tok.bos_token is None or tok.bos_token != "[DEC]":
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Training outputs (recipe.yaml + trainable weights)


def _is_run_dir(path: Path) -> bool:
    return (path / RUN_RECIPE).is_file() and (path / RUN_WEIGHTS).is_file()


def load_run_dir(path: Path, place_args: tuple[str, ...], name: str) -> Blip2:
    """A `blip2 pretrain/finetune` output: the recipe says how to rebuild the frozen parts."""
    cfg = model_config_from_yaml(path / RUN_RECIPE)
    trained = read_safetensors(path / RUN_WEIGHTS)
    model = build_model(cfg, place_args, tokenizer_source=path, initialize=False)
    place = placement(*place_args, t5=_is_t5(model))
    fill(model, trained.items(), place, allow_missing=(), strict=True, source=str(path))
    return finish(model, place, name, _fingerprint([path / RUN_WEIGHTS]))


def _is_t5(model: Blip2) -> bool:
    return model.llm is not None and model.llm.is_encoder_decoder


def build_model(cfg: ModelConfig, place_args: tuple[str, ...] = ("auto", "auto"),
                tokenizer_source: str | Path | None = None, initialize: bool = True) -> Blip2:
    """A model from its config: frozen LLM and vision weights from their named sources. With `initialize`, the
    rest gets fresh initial values (training); without, it stays on the meta device for a checkpoint to fill,
    so anything the checkpoint lacks is reported as missing."""
    llm_config = llm_tok = None
    if cfg.llm.enabled:
        from transformers import AutoConfig, AutoTokenizer

        src = cfg.llm.name
        tok_src = Path(tokenizer_source) / LLM_TOKENIZER_DIR if tokenizer_source else None
        llm_tok = pretrained(AutoTokenizer.from_pretrained, tok_src if tok_src and tok_src.is_dir() else src, LLM_FIX)
        llm_config = pretrained(AutoConfig.from_pretrained, src, LLM_FIX)
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
    """The Q-Former's starting point, as LAVIS builds it (LAVIS Qformer): BERT's embeddings, self-attention and
    FFN, the FFN copied into the query FFN, BERT's MLM head as the ITG head, the vocabulary grown for [DEC]
    (new rows: the mean embedding). Cross-attention stays randomly initialised."""
    path = Path(source)
    directory = path if path.is_dir() else download(source, fix="--set model.qformer.init_from=DIR (a BERT folder)")
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
    directory = path if path.is_dir() else (download(name, fix=LLM_FIX) if looks_like_hub_id(name) else None)
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
            elif n in ("cls_token", "pos_embed") or "." in n and not n.startswith(("head.", "norm.", "fc_norm.")):
                yield "vision.tower." + n, t  # raw EVA file (eva_vit_g.pth); block 39 is ignored below
        return
    directory = path if path.is_dir() else download(source, fix=VISION_FIX)
    for n, t in _split_biases(iter_tensors(checkpoint_files(directory))):
        if n.startswith("vision_model."):
            yield hf_to_ours(n), t


# ---------------------------------------------------------------------------------------------------------------
# The entry point


def load_lavis(path: Path, place_args: tuple[str, ...], name: str, vision: str | None, llm: str | None,
               tokenizer: str = "bert-base-uncased", stated: Architecture | None = None) -> Blip2:
    """A LAVIS `.pth` (with its ViT and LLM named when the file lacks them): read and translated by `lavis`,
    built and filled here like every other format."""
    found = read_lavis(path, vision, llm, tokenizer, stated)
    model = build_model(found.config, place_args, initialize=False)
    place = placement(*place_args, t5=model.llm is not None and model.llm.is_encoder_decoder)
    fill(model, found.tensors, place, allow_missing=found.allow_missing, strict=True, source=str(path))
    return finish(model, place, name, _fingerprint([path]))


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto", *, vision: str | None = None,
               llm: str | None = None, quantize: str = "none", backend: str | None = None,
               revision: str | None = None, cache_dir: Path | str | None = None) -> Blip2:
    """Everything `--model` accepts -> a ready Blip2 in eval mode on its device. `quantize` (none|int8|int4):
    the frozen ViT's and LLM's linear layers, quantized while they load (model/quantize.py) by `backend`
    (torchao|bitsandbytes; None: bitsandbytes on CUDA, torchao on a CPU). A hub id is
    downloaded at `revision` (branch, tag or commit; default main) into `cache_dir` (default: the standard
    Hugging Face cache, HF_HUB_CACHE or HF_HOME/hub), as `hf download --revision --cache-dir` does."""
    path = Path(name_or_path).expanduser()
    args = (device, dtype, quantize, backend, True)  # placement(..., inference=True)
    if revision is not None and (path.exists() or not looks_like_hub_id(name_or_path)):
        raise UsageError(f"--revision {revision}: {name_or_path} is not a hub id (a revision picks a hub commit)")
    if path.is_dir():
        if _is_run_dir(path):
            return load_run_dir(path, args, name_or_path)
        if _is_hf_dir(path):
            return load_hf_dir(path, args, name_or_path)
        if (path / "final").is_dir():
            return load_model(str(path / "final"), device, dtype, vision=vision, llm=llm, quantize=quantize,
                              backend=backend)
        raise UsageError(f"{path}: not a BLIP-2 checkpoint (expected a Hugging Face BLIP-2 config.json, "
                         f"or {RUN_RECIPE} + {RUN_WEIGHTS} from blip2 pretrain/finetune)")
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):  # a LAVIS checkpoint with its ViT and LLM named
            spec = read_model_file(path)
            return load_lavis(Path(spec.checkpoint), args, name_or_path, spec.vision, spec.llm, spec.tokenizer,
                              spec.architecture)
        if path.suffix in (".pth", ".pt", ".bin"):
            return load_lavis(path, args, name_or_path, vision, llm)
        raise UsageError(f"{path}: not a checkpoint file (expected a LAVIS .pth, a model .yaml or a model folder)")
    if looks_like_hub_id(name_or_path):
        return load_hf_dir(download(name_or_path, revision=revision, cache_dir=cache_dir), args, name_or_path)
    raise UsageError(f"no such model: {name_or_path!r} (not a file, a folder or a hub id)")
