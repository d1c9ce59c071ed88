"""The model core: masks, freezing, which parameters train, stage-1/2 objectives and Q-Former captioning."""

from __future__ import annotations

import pytest
import torch

from blip2cli.config import GenerationOptions, ModelConfig, QFormerConfig, VisionConfig
from blip2cli.model.blip2 import Blip2
from blip2cli.model.load import load_model
from blip2cli.model.qformer import _itg_mask
from tests import tiny


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Blip2:
    tok = tiny.bert_tokenizer(tmp_path_factory.mktemp("bert"))
    cfg = ModelConfig(
        vision=VisionConfig(image_size=28, patch_size=14, width=32, depth=2, heads=4, mlp_dim=64),
        qformer=QFormerConfig(num_queries=4, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                              vocab_size=len(tok), max_position_embeddings=64, embed_dim=16, max_text_len=12),
    )
    torch.manual_seed(0)
    return Blip2(cfg, tokenizer=tok)


def test_itg_mask_by_hand():
    """Text row i sees every query and text j <= i that is not padding (LAVIS Qformer)."""
    pad = torch.tensor([[1, 1, 1, 0]])
    m = _itg_mask(pad, cached=2, T=4)[0, 0].int()
    expected = torch.tensor([
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
    ])
    assert torch.equal(m, expected)


def test_itg_text_is_causal_and_sees_queries(stage1):
    stage1.eval()
    px = tiny.pixels(1)
    ids = torch.tensor([[stage1.tokenizer.bos_token_id, 7, 8, 9, 10]])
    other = ids.clone()
    other[0, 4] = 11  # change the last token only
    mask = torch.ones_like(ids)
    with torch.no_grad():
        _, cache = stage1.query_image(stage1.vision_embeds(px))
        a, _ = stage1.qformer.decode_text(ids, mask, cache)
        b, _ = stage1.qformer.decode_text(other, mask, cache)
        _, cache2 = stage1.query_image(stage1.vision_embeds(tiny.pixels(1, seed=9)))
        c, _ = stage1.qformer.decode_text(ids, mask, cache2)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)  # earlier text never sees later text
    assert not torch.allclose(a[:, 4], b[:, 4])
    assert not torch.allclose(a, c)  # text sees the queries (through the cached K/V)


def test_queries_never_see_text_and_itm_is_bidirectional(stage1):
    stage1.eval()
    e = stage1.vision_embeds(tiny.pixels(1))
    with torch.no_grad():
        z1 = stage1.query_image(e)[0]
        q = stage1.query_tokens
        ids = torch.tensor([[2, 7, 8, 3]])
        h1 = stage1.qformer.encode_joint(q, ids, torch.ones_like(ids), e)
        h2 = stage1.qformer.encode_joint(q, torch.tensor([[2, 7, 9, 3]]), torch.ones_like(ids), e)
    assert torch.allclose(z1, stage1.query_image(e)[0])
    assert not torch.allclose(h1[:, :4], h2[:, :4])  # ITM: queries attend to the text


def test_frozen_vision_stays_frozen(stage1):
    stage1.train()
    assert not stage1.vision.training and not any(m.training for m in stage1.vision.modules())
    assert all(not p.requires_grad for p in stage1.vision.parameters())
    assert stage1.qformer.training and stage1.ln_vision.weight.requires_grad


def test_stage1_gradients_reach_exactly_the_trainable_parameters(stage1):
    stage1.train()
    stage1.zero_grad()
    out = stage1.stage1_loss(tiny.pixels(3), ["a dog running", "a red bicycle", "two cats on a blanket"])
    assert torch.isfinite(out.loss) and out.itc > 0 and out.itm > 0 and out.itg > 0
    out.loss.backward()
    for name, p in stage1.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    assert stage1.temp.grad is not None and stage1.temp.grad.abs() > 0


def test_stage2_gradients_skip_the_frozen_llm(tiny_opt_dir):
    model = load_model(str(tiny_opt_dir), "cpu", "float32")
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for part in (model.qformer, model.ln_vision, model.llm_proj):
        part.requires_grad_(True)
    model.query_tokens.requires_grad_(True)
    out = model.stage2_loss(tiny.pixels(2), ["a photo of a dog", "a photo of a cat"], prompt="a photo of")
    out.loss.backward()
    assert model.llm_proj.weight.grad is not None and model.query_tokens.grad is not None
    assert all(p.grad is None for p in model.llm.parameters())
    assert not model.llm.training


def test_qformer_captioning_greedy_and_beam(stage1):
    stage1.eval()
    for beams in (1, 3):
        out = stage1.generate(tiny.pixels(2), ["", ""], GenerationOptions(num_beams=beams, max_new_tokens=6,
                                                                           num_return_sequences=1))
        assert len(out) == 2 and all(len(c) == 1 and isinstance(c[0], str) for c in out)


def test_stage1_model_without_text_head_refuses_itg(tiny_opt_dir):
    model = load_model(str(tiny_opt_dir), "cpu", "float32")
    with pytest.raises(ValueError, match="no vision_proj"):
        model.image_features(model.vision_embeds(tiny.pixels(1)))


def test_qformer_starts_from_bert_like_lavis(tmp_path):
    """init_from copies BERT's embeddings/attention/FFN, the FFN into the query FFN, and grows the vocab by [DEC]."""
    from transformers import BertConfig, BertForMaskedLM

    from blip2cli.model.load import build_model

    tok = tiny.bert_tokenizer(tmp_path / "bert")
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tok) - 1, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "bert")
    cfg = ModelConfig(
        vision=VisionConfig(image_size=28, patch_size=14, width=32, depth=1, heads=4, mlp_dim=64),
        qformer=QFormerConfig(num_queries=4, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                              vocab_size=len(tok), max_position_embeddings=64, embed_dim=16,
                              tokenizer=str(tmp_path / "bert"), init_from=str(tmp_path / "bert")),
    )
    model = build_model(cfg, ("cpu", "float32"))
    layer, ref = model.qformer.encoder.layer[1], bert.bert.encoder.layer[1]
    assert torch.equal(layer.attention.self.query.weight, ref.attention.self.query.weight)
    assert torch.equal(layer.intermediate.dense.weight, ref.intermediate.dense.weight)
    assert torch.equal(layer.intermediate_query.dense.weight, ref.intermediate.dense.weight)
    assert torch.equal(layer.output_query.LayerNorm.weight, ref.output.LayerNorm.weight)
    words = model.qformer.embeddings.word_embeddings.weight
    assert words.shape[0] == len(tok) and torch.equal(words[:-1], bert.bert.embeddings.word_embeddings.weight)
    assert model.qformer.cls.predictions.decoder.weight is words  # tied
    head = model.qformer.cls.predictions.transform.dense.weight
    assert torch.equal(head, bert.cls.predictions.transform.dense.weight)


def test_timm_vision_tower_is_an_alternative(tmp_path):
    tok = tiny.bert_tokenizer(tmp_path / "bert")
    cfg = ModelConfig(
        vision=VisionConfig(kind="timm", timm_name="vit_tiny_patch16_224", image_size=32, patch_size=16),
        qformer=QFormerConfig(num_queries=4, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                              vocab_size=len(tok), max_position_embeddings=64, embed_dim=16),
    )
    model = Blip2(cfg, tokenizer=tok)
    model.train()
    e = model.vision_embeds(torch.randn(2, 3, 32, 32))
    assert e.shape == (2, 5, 192) and not model.vision.training
    assert model.image_features(e).shape == (2, 4, 16)


def test_stage1_multi_positive_mode_needs_integer_ids(stage1):
    stage1.train()
    texts = ["a dog running", "a dog on the beach", "two cats"]
    out = stage1.stage1_loss(tiny.pixels(3), texts, image_ids=torch.tensor([7, 7, 9]))
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError):
        stage1.stage1_loss(tiny.pixels(3), texts, image_ids=torch.tensor([7.0, 7.0, 9.0]))


def test_hf_retrieval_checkpoint_warns_only_when_its_itg_head_is_used(tiny_retrieval_model_dir):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_model(str(tiny_retrieval_model_dir), "cpu", "float32")  # retrieval use: silent
    assert model.fresh_itg_head
    with pytest.warns(UserWarning, match="no trained ITG head"):
        model.generate(tiny.pixels(1), [""], GenerationOptions(num_beams=1, max_new_tokens=2))


def test_itm_with_shared_image_projections_equals_projecting_every_pair(stage1):
    stage1.eval()
    e = stage1.vision_embeds(tiny.pixels(2, seed=4))  # two images, paired as [e0, e1, e1, e0]
    order = torch.tensor([0, 1, 1, 0])
    ids = torch.tensor([[2, 7, 8, 3], [2, 9, 3, 0], [2, 7, 3, 0], [2, 8, 9, 3]])
    mask = (ids != 0).long()
    queries = stage1.query_tokens.expand(4, -1, -1)
    with torch.no_grad():
        direct = stage1.qformer.encode_joint(queries, ids, mask, e[order])
        kv = [None if x is None else (x[0][order], x[1][order]) for x in stage1.qformer.image_kv(e)]
        shared = stage1.qformer.encode_joint(queries, ids, mask, None, kv)
    assert torch.allclose(direct, shared, atol=1e-6)
