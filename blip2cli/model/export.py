"""Export to Hugging Face BLIP-2 format, so a model trained here loads in transformers.

Models with an LLM become `Blip2ForConditionalGeneration` (with a `Blip2Processor`); text-capable stage-1 models
become `Blip2ForImageTextRetrieval`. What HF has no place for (`temp`, the ITG head `Qformer.cls.*`, a non-zero
key bias) goes into a sidecar file that our loader reads back (HF's conversion script).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from blip2cli.model.blip2 import Blip2
from blip2cli.model.load import SIDECAR
from blip2cli.model.names import fuse_qkv_biases, ours_to_hf
from blip2cli.model.weights import save_safetensors


def hf_config(model: Blip2, image_token_index: int | None):
    """Blip2Config equivalent of our ModelConfig (+ the LLM's own config)."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

    v, q = model.cfg.vision, model.cfg.qformer
    if v.kind != "eva":
        raise ValueError("only EVA-layout vision towers can be exported to Hugging Face BLIP-2 format")
    vision = Blip2VisionConfig(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                               num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
                               layer_norm_eps=v.layer_norm_eps, qkv_bias=v.qkv_bias)
    qformer = Blip2QFormerConfig(vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
                                 num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size,
                                 hidden_dropout_prob=q.dropout, attention_probs_dropout_prob=q.attention_dropout,
                                 max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
                                 cross_attention_frequency=q.cross_attention_every, encoder_hidden_size=v.width,
                                 use_qformer_text_input=model.llm is None and q.text)
    text = model.llm.model.config.to_dict() if model.llm is not None else None
    arch = "Blip2ForConditionalGeneration" if model.llm is not None else "Blip2ForImageTextRetrieval"
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text,
                       num_query_tokens=q.num_queries, image_text_hidden_size=q.embed_dim,
                       image_token_index=image_token_index, architectures=[arch])


def _llm_with_image_token(model: Blip2) -> int:
    """Make sure the LLM tokenizer has `<image>` and the embedding table has a row for it (HF's processor
    expands the 32 query slots as `<image>` tokens). Returns its id."""
    tok = model.llm.tokenizer
    if "<image>" not in tok.get_vocab():
        from transformers import AddedToken

        tok.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    rows = model.llm.model.get_input_embeddings().weight.shape[0]
    if image_id >= rows:
        model.llm.model.resize_token_embeddings(image_id + 1)
    return image_id


def export_hf(model: Blip2, out: str | Path) -> Path:
    """Write config.json, model.safetensors, tokenizer/processor files and the sidecar into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image_id = _llm_with_image_token(model) if model.llm is not None else None
    config = hf_config(model, image_id)
    state = fuse_qkv_biases({k: v for k, v in model.state_dict().items()})
    hf_state: dict[str, Tensor] = {}
    for name, tensor in state.items():
        hf_name = ours_to_hf(name)
        if hf_name is None or name.endswith("cls.predictions.decoder.weight") or _is_tied_llm(model, name):
            continue
        hf_state[hf_name] = tensor
    save_safetensors(hf_state, out / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out)
    extra = {k: v for k, v in model.state_dict().items() if k == "temp" or k.startswith("qformer.cls.")
             and not k.endswith("decoder.weight")}
    if extra:
        save_safetensors(extra, out / SIDECAR)
    _save_processing(model, out, config)
    return out


def _is_tied_llm(model: Blip2, name: str) -> bool:
    """The LLM's output layer when it shares the input embeddings (saved once, as transformers does)."""
    if model.llm is None or not name.startswith("llm.model."):
        return False
    out = model.llm.model.get_output_embeddings()
    inp = model.llm.model.get_input_embeddings()
    if out is None or out.weight is not inp.weight:
        return False
    return name == "llm.model." + _param_name(model.llm.model, out.weight)


def _param_name(module: torch.nn.Module, param: Tensor) -> str:
    names = [n for n, p in module.named_parameters(remove_duplicate=False) if p is param]
    return names[-1]


def _save_processing(model: Blip2, out: Path, config) -> None:
    from transformers import Blip2Processor, BlipImageProcessor

    images = BlipImageProcessor(size={"height": model.cfg.vision.image_size, "width": model.cfg.vision.image_size},
                                image_mean=list(model.cfg.image_mean), image_std=list(model.cfg.image_std),
                                do_convert_rgb=True)
    if model.llm is not None:
        Blip2Processor(image_processor=images, tokenizer=model.llm.tokenizer,
                       num_query_tokens=config.num_query_tokens).save_pretrained(out)
    else:
        images.save_pretrained(out)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(out)
