"""oneDNN-packed linear layers for decoding several rows at a time (model/packed.py): the same products as
nn.Linear within fp32 rounding, the same tokens as transformers' generate on the unpacked model, and packing only
where it pays and is safe (several rows; models loaded for inference; shared weights kept)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blip2cli.config import GenerationOptions
from blip2cli.model import packed
from blip2cli.model.load import load_model
from tests import tiny

pytestmark = pytest.mark.skipif(not packed.available(torch.device("cpu")), reason="this torch has no oneDNN packing")


@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (3, 1, 48), (2, 7, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_products_match_nn_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want = linear(x)
        have = packed.PackedLinear(linear)(x)
    assert have.shape == want.shape
    torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_input():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    layer = packed.PackedLinear(linear)
    x = torch.randn(2, 8, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, linear.weight.detach().sum(0).expand(2, 8))


def _reference(model, prefix, prompts, o: GenerationOptions):
    llm = model.llm
    if llm.is_encoder_decoder:
        embeds, mask = llm.encoder_inputs(prefix, prompts, truncate=False)
    else:
        embeds, mask = llm.decoder_inputs(prefix, prompts)
    return llm.model.generate(inputs_embeds=embeds, attention_mask=mask, **llm._generate_kwargs(o))


@pytest.mark.parametrize("fixture", ["tiny_opt_dir", "tiny_t5_dir"])
def test_beam_search_packs_and_keeps_generates_tokens(fixture, request):
    path = str(request.getfixturevalue(fixture))
    model, plain = load_model(path, "cpu", "float32"), load_model(path, "cpu", "float32")
    plain.llm.pack_for_decoding = False
    prompts = ["a photo of", "a dog", "question: what is it? short answer:"]
    with torch.inference_mode():
        prefix = model.llm_prefix(model.vision_embeds(tiny.pixels(len(prompts), seed=5)))
        for o in (GenerationOptions(num_beams=3, max_new_tokens=9, min_new_tokens=2),
                  GenerationOptions(num_beams=1, max_new_tokens=9),
                  GenerationOptions(num_beams=4, max_new_tokens=8, num_return_sequences=2, length_penalty=0.0)):
            want = _reference(plain, prefix, prompts, o)
            have = model.llm.generate_tokens(prefix, prompts, o)
            assert have.tolist() == want.tolist(), o
    assert model.llm.packed and not plain.llm.packed
    have_state, want_state = model.llm.model.state_dict(), plain.llm.model.state_dict()
    assert have_state.keys() == want_state.keys()  # export_hf after a beam search writes every weight
    assert all(torch.equal(have_state[k], want_state[k]) for k in want_state)
    layers = list(model.llm.model.modules())
    assert any(isinstance(m, packed.PackedLinear) for m in layers)
    assert not any(type(m) is nn.Linear for m in layers)


@pytest.mark.parametrize("fixture", ["tiny_opt_dir", "tiny_t5_dir"])
def test_one_row_transposes_only_the_head(fixture, request):
    """Greedy at one row packs nothing; the LM head's weight (OPT: the shared embeddings) changes layout, not
    value, the other linears keep theirs, the tokens are generate's, and a later beam search still packs."""
    path = str(request.getfixturevalue(fixture))
    model, plain = load_model(path, "cpu", "float32"), load_model(path, "cpu", "float32")
    plain.llm.pack_for_decoding = False
    lm = model.llm.model
    head = lm.get_output_embeddings().weight
    before = head.detach().clone()
    prompts = ["a photo of"]
    o = GenerationOptions(num_beams=1, max_new_tokens=9)
    with torch.inference_mode():
        prefix = model.llm_prefix(model.vision_embeds(tiny.pixels(1, seed=3)))
        assert model.llm.generate_tokens(prefix, prompts, o).tolist() == _reference(plain, prefix, prompts, o).tolist()
    assert not model.llm.packed
    assert lm.get_output_embeddings().weight is head and torch.equal(head, before)
    assert head.stride() == (1, head.shape[0])  # (V, D) viewed from a contiguous (D, V)
    assert not lm.config.tie_word_embeddings or lm.get_input_embeddings().weight is head
    others = [m for m in lm.modules() if type(m) is nn.Linear and m.weight is not head]
    assert others and all(m.weight.is_contiguous() for m in others)
    assert not packed.transpose_head(lm)  # once
    with torch.inference_mode():
        model.llm.generate_tokens(prefix.repeat(2, 1, 1), prompts * 2, GenerationOptions(num_beams=2, max_new_tokens=4))
    assert model.llm.packed
    state = model.llm.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain.llm.model.state_dict().items())


def test_tied_lm_head_leaves_the_embeddings(tiny_opt_dir):
    """OPT's LM head is its input embedding matrix: packing the head copies it and leaves the embeddings."""
    model = load_model(str(tiny_opt_dir), "cpu", "float32")
    lm = model.llm.model
    embeddings = lm.get_input_embeddings().weight
    assert lm.get_output_embeddings().weight is embeddings
    before = embeddings.detach().clone()
    with torch.inference_mode():
        model.generate(tiny.pixels(2), ["", ""], GenerationOptions(num_beams=2, max_new_tokens=4))
        assert isinstance(lm.lm_head, packed.PackedLinear)
        assert lm.get_input_embeddings().weight is embeddings and torch.equal(embeddings, before)
        x = torch.randn(3, embeddings.shape[1])
        torch.testing.assert_close(lm.lm_head(x), F.linear(x, embeddings), rtol=1e-5, atol=1e-5)


def test_models_that_train_never_pack(tiny_opt_dir):
    """build_model (training) leaves pack_for_decoding off: a model that trains keeps nn.Linear."""
    from blip2cli.model.llm import FrozenLLM

    model = load_model(str(tiny_opt_dir), "cpu", "float32")
    fresh = FrozenLLM(model.llm.model, model.llm.tokenizer)
    assert fresh.pack_for_decoding is False
    with torch.inference_mode():
        fresh.generate_tokens(torch.zeros(2, 4, fresh.hidden_size), ["", ""],
                              GenerationOptions(num_beams=2, max_new_tokens=3))
    assert not fresh.packed
