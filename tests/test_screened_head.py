"""Greedy's argmax over the fp32 LM head screened by an int8 copy (model/screened_head.py): the error bound of
Int8Linear.bounded holds against the fp32 product of the original weights, the screened argmax is the full
product's argmax under the repetition penalty and EOS blocking, the full product runs where the screen is too
loose, and an int8 model's greedy captions are transformers' own tokens over its fp32 head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blip2cli.config import GenerationOptions
from blip2cli.model import int8_linear, screened_head
from blip2cli.model.decode import block_eos, penalise
from blip2cli.model.load import load_model
from tests import tiny

pytestmark = pytest.mark.skipif(not int8_linear.available(), reason="this torch has no fbgemm quantized engine")


def _weights(vocab=3000, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, generator=g) * 0.05
    weight[7] *= 4  # rows of very different scales
    return weight, torch.randn(vocab, generator=g) * 0.1


def _hidden(rows, dim=64, seed=1, outliers=False):
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)) * 2
    if outliers:
        x[:, 3] = 30.0  # OPT-style outlier features: multiplied apart in fp32
        x[0, 40] = -8.0
    return x


@pytest.mark.parametrize("reduce_range", [False, True], ids=["8-bit", "7-bit"])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("rows", [1, 4])
def test_the_bound_holds_against_the_fp32_product(reduce_range, outliers, rows, monkeypatch):
    monkeypatch.setattr(int8_linear, "REDUCE_RANGE", reduce_range)
    weight, bias = _weights()
    layer = int8_linear.from_weight(weight, bias)
    for seed in range(5):
        x = _hidden(rows, seed=seed, outliers=outliers)
        with torch.inference_mode():
            y, bound = layer.bounded(x)
            exact = F.linear(x, weight, bias)
        assert torch.equal(y, layer(x))  # the same product as forward
        error = (y - exact).abs()
        assert (error <= bound).all(), float((error - bound).max())
        assert float(bound.mean()) < 60 * float(error.mean())  # worst case over every feature, yet within 60x


def _transforms(rows):
    history = torch.tensor([[5, 9, 11]] * rows)
    eos = torch.tensor([2, 5])
    return [
        lambda s: s,
        lambda s: penalise(s, history, 1.3),  # divides positive, multiplies negative scores
        lambda s: block_eos(penalise(s, history, 0.7), eos, 0, 3),  # < 1 favours the seen tokens; EOS blocked
    ]


@pytest.mark.parametrize("rows", [1, 3])
def test_picks_the_argmax_of_the_full_product(rows):
    weight, bias = _weights()
    head = screened_head.ScreenedHead(weight, bias)
    picked = 0
    for seed in range(20):
        x = _hidden(rows, seed=seed, outliers=seed % 2 == 1)
        # make the race close: two tokens within the int8 error of each other at the top
        x[0] = x[0] + 0.5 * weight[123] / weight[123].norm() ** 2
        for transform in _transforms(rows):
            with torch.inference_mode():
                want = transform(F.linear(x, weight, bias)).argmax(-1)
                have = head.pick(x, transform)
            assert have.tolist() == want.tolist()
            picked += 1
    assert picked == 60


def test_falls_back_to_the_full_product_when_the_screen_is_loose(monkeypatch):
    weight, bias = _weights()
    head = screened_head.ScreenedHead(weight, bias)
    calls = []
    full = head.logits
    monkeypatch.setattr(head, "logits", lambda h: calls.append(1) or full(h))
    x = _hidden(2)
    with torch.inference_mode():
        head.pick(x, lambda s: s)
        assert not calls  # a few candidates: no full product
        monkeypatch.setattr(screened_head, "MAX_SHARE", 0.0)
        assert head.pick(x, lambda s: s).tolist() == F.linear(x, weight, bias).argmax(-1).tolist()
    assert calls == [1]


def _reference(model, prefix, prompts, o):
    embeds, mask = model.llm.decoder_inputs(prefix, prompts)
    return model.llm.model.generate(inputs_embeds=embeds, attention_mask=mask, **model.llm._generate_kwargs(o))


def test_int8_greedy_captions_are_the_fp32_heads_tokens(tiny_opt_dir):
    """The int8 model's greedy decode screens its fp32 head and gives the tokens transformers' generate gives with
    the full head on the same int8 model: batch 1 and a batch whose rows finish at different steps, with the
    repetition penalty and a minimum length."""
    model = load_model(str(tiny_opt_dir), "cpu", "float32", quantize="int8")
    mixed = ["a photo of", "a dog", "question: what is it? answer:"]
    with torch.inference_mode():
        prefix = model.llm_prefix(model.vision_embeds(tiny.pixels(3, seed=7)))
        # transformers' penalty skips a left-padded row's first tokens (decode.py): the same prompt for it
        for o, prompts in ((GenerationOptions(num_beams=1, max_new_tokens=12), mixed),
                           (GenerationOptions(num_beams=1, max_new_tokens=10, min_new_tokens=4,
                                              repetition_penalty=1.4), ["a photo of"] * 3)):
            for rows in (slice(0, 1), slice(0, 3)):
                want = _reference(model, prefix[rows], prompts[rows], o)
                have = model.llm.generate_tokens(prefix[rows], prompts[rows], o)
                assert have.tolist() == want.tolist(), o
    assert isinstance(model.llm.screen, screened_head.ScreenedHead)
    assert not model.llm.packed  # screened greedy decoding multiplies by no fp32 weight that packing would help
    head = model.llm.model.get_input_embeddings().weight
    assert model.llm.screen.weight is head and head.is_contiguous()  # the tied fp32 head itself, rows contiguous
    beams = GenerationOptions(num_beams=3, max_new_tokens=6)
    greedy = GenerationOptions(num_beams=1, max_new_tokens=12)
    with torch.inference_mode():  # beam search packs the head; greedy screens with the embeddings after it
        assert model.llm.generate_tokens(prefix, mixed, beams).tolist() == _reference(model, prefix, mixed, beams).tolist()
        assert model.llm.packed
        assert model.llm.generate_tokens(prefix, mixed, greedy).tolist() == _reference(model, prefix, mixed,
                                                                                        greedy).tolist()


def test_only_int8_models_screen(tiny_opt_dir):
    model = load_model(str(tiny_opt_dir), "cpu", "float32")
    with torch.inference_mode():
        model.generate(tiny.pixels(1), ["a photo of"], GenerationOptions(num_beams=1, max_new_tokens=4))
    assert model.llm.screen is False
