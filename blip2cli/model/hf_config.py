"""Hugging Face BLIP-2 configs (config.json, `Blip2Config`) -> our ModelConfig, every size checked."""

from __future__ import annotations

from blip2cli.config import LLMConfig, ModelConfig, QFormerConfig, VisionConfig
from blip2cli.errors import UsageError
from blip2cli.model.sizes import config_float, config_int

HF_VISION_KEYS = {"image_size": "image_size", "patch_size": "patch_size", "width": "hidden_size",
                  "depth": "num_hidden_layers", "heads": "num_attention_heads", "mlp_dim": "intermediate_size",
                  "layer_norm_eps": "layer_norm_eps"}
HF_QFORMER_KEYS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                   "intermediate_size": "intermediate_size", "cross_attention_every": "cross_attention_frequency",
                   "vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings",
                   "layer_norm_eps": "layer_norm_eps", "dropout": "hidden_dropout_prob",
                   "attention_dropout": "attention_probs_dropout_prob"}


def model_config_from_hf(hf) -> ModelConfig:
    """Blip2Config -> ModelConfig. Retrieval checkpoints keep the text half of the Q-Former. Every size is checked
    (type and range) and a bad one is named by its config.json key."""
    v, q = hf.vision_config, hf.qformer_config
    arch = (hf.architectures or ["Blip2ForConditionalGeneration"])[0]
    text = bool(q.use_qformer_text_input) or "Retrieval" in arch or "WithProjection" in arch
    vision = _hf_section(VisionConfig, v, "vision_config", HF_VISION_KEYS, qkv_bias=bool(v.qkv_bias),
                         ln_vision_eps=config_float(v, "layer_norm_eps", "vision_config"))
    qformer = _hf_section(QFormerConfig, q, "qformer_config", HF_QFORMER_KEYS, text=text,
                          num_queries=config_int(hf, "num_query_tokens", "config"),
                          embed_dim=config_int(hf, "image_text_hidden_size", "config"))
    llm = LLMConfig()
    if "Retrieval" not in arch and "WithProjection" not in arch and getattr(hf, "text_config", None) is not None:
        llm = LLMConfig(name="(in checkpoint)", eos_text="\n" if hf.text_config.model_type == "opt" else "")
    return ModelConfig(vision=vision, qformer=qformer, llm=llm)


def _hf_section(cls, section, where: str, keys: dict[str, str], **given):
    """One of our config dataclasses from a transformers sub-config; a range error names the config.json key."""
    values = {ours: (config_float if ours.endswith(("eps", "dropout")) else config_int)(section, hf_key, where)
              for ours, hf_key in keys.items()}
    try:
        return cls(**values, **given)
    except UsageError as exc:
        key, _, rest = str(exc).partition(":")
        ours = key.rsplit(".", 1)[-1]
        top = {"num_queries": "config.num_query_tokens", "embed_dim": "config.image_text_hidden_size"}
        raise UsageError(f"{where}.{keys[ours]}:{rest}" if ours in keys else f"{top.get(ours, key)}:{rest}") from None
