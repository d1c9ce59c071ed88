"""The frozen LLM: other decoder-only families than OPT, and the precision rules."""

from __future__ import annotations

import pytest
import torch

from blip2cli.config import GenerationOptions, LLMConfig, ModelConfig, QFormerConfig, VisionConfig
from blip2cli.model.load import build_model, load_model
from tests import tiny


def _llm_dir(tmp_path, family: str):
    import transformers

    tok = tiny.opt_tokenizer(tmp_path)  # byte-level BPE; "\n" is one token
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family](**common)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_other_decoder_llms_train_and_generate(tmp_path, family):
    llm = _llm_dir(tmp_path / "llm", family)
    tok_dir = tmp_path / "bert"
    qtok = tiny.bert_tokenizer(tok_dir)
    cfg = ModelConfig(
        vision=VisionConfig(image_size=28, patch_size=14, width=32, depth=1, heads=4, mlp_dim=64),
        qformer=QFormerConfig(num_queries=4, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                              vocab_size=len(qtok), max_position_embeddings=64, text=False),
        llm=LLMConfig(name=str(llm)),
    )
    model = build_model(cfg, ("cpu", "float32"))
    model.train()
    out = model.stage2_loss(tiny.pixels(2), ["a photo of a dog", "a photo of a cat"], prompt="a photo of")
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.llm_proj.weight.grad is not None
    assert all(p.grad is None for p in model.llm.parameters())
    model.eval()
    texts = model.generate(tiny.pixels(2), ["a photo of", "a dog"], GenerationOptions(num_beams=2, max_new_tokens=5))
    assert len(texts) == 2 and all(isinstance(t[0], str) for t in texts)
    assert "\n" not in "".join(t[0] for t in texts)  # generation stops at eos_text


def test_half_precision_towers_keep_qformer_fp32(tiny_opt_dir):
    model = load_model(str(tiny_opt_dir), "cpu", "bfloat16")
    assert model.vision.tower.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.vision.tower.blocks[0].norm1.weight.dtype == torch.float32  # LayerNorms stay fp32 (LAVIS eva_vit)
    assert model.llm.dtype == torch.bfloat16
    assert model.query_tokens.dtype == torch.float32 and model.ln_vision.weight.dtype == torch.float32
    assert next(model.qformer.parameters()).dtype == torch.float32
    e = model.vision_embeds(tiny.pixels(1))
    assert e.dtype == torch.float32
    assert len(model.generate(tiny.pixels(1), [""], GenerationOptions(num_beams=1, max_new_tokens=3))) == 1


def test_flan_t5_is_never_float16(tiny_t5_dir):
    with pytest.warns(UserWarning, match="Flan-T5 does not run in float16"):
        model = load_model(str(tiny_t5_dir), "cpu", "float16")
    assert model.llm.dtype == torch.bfloat16
