"""Our decoding loop against transformers' `generate` on the same LM and inputs: identical tokens across beam
counts, length penalties, minimum lengths, repetition penalties, early-stopping modes and several return
sequences, with an EOS set chosen so that hypotheses finish early and often."""

from __future__ import annotations

import itertools

import pytest

from blip2cli.config import GenerationOptions
from blip2cli.model import decode
from blip2cli.model.load import load_model
from tests import tiny


def _inputs(model, prompts):
    prefix = model.llm_prefix(model.vision_embeds(tiny.pixels(len(prompts), seed=21)))
    if model.llm.is_encoder_decoder:
        return model.llm.encoder_inputs(prefix, prompts, truncate=False)
    return model.llm.decoder_inputs(prefix, prompts)


def _frequent_tokens(model, embeds, mask, n=2):
    """EOS ids that occur often in unconstrained greedy output, so many hypotheses end early."""
    out = model.llm.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                   eos_token_id=None, pad_token_id=model.llm.tokenizer.pad_token_id)
    ids, counts = out.flatten().unique(return_counts=True)
    ids = ids[ids != model.llm.model.config.decoder_start_token_id] if model.llm.is_encoder_decoder else ids
    return ids[counts[: len(ids)].argsort(descending=True)][:n].tolist()


SETTINGS = [
    dict(num_beams=b, length_penalty=lp, min_new_tokens=mn, repetition_penalty=rp, num_return_sequences=nr)
    for b, lp, mn, rp, nr in itertools.product([1, 3, 5], [1.0, 0.0, -1.0, 2.0], [0, 3], [1.0, 1.3], [1, 2])
    if not (b == 1 and (nr > 1 or lp != 1.0))
]


@pytest.mark.parametrize("fixture", ["tiny_opt_dir", "tiny_t5_dir"])
def test_same_tokens_as_generate(fixture, request):
    model = load_model(str(request.getfixturevalue(fixture)), "cpu", "float32")
    lm, tok = model.llm.model, model.llm.tokenizer
    padded = _inputs(model, ["a photo of", "a dog", "question: what is unusual? short answer:"])
    # transformers 5 skips the first n generated tokens of a left-padded row in its repetition penalty when given
    # inputs_embeds only (it reads n from the mask); we penalise every generated token: compare without padding.
    unpadded = _inputs(model, ["a photo of"] * 3)
    eos = _frequent_tokens(model, *padded)
    checked = 0
    combos = [(s, e) for s, e in itertools.product(SETTINGS, [False, True, "never"])
              if s["num_beams"] > 1 or e is False]
    for s, early in combos[::2]:  # a fixed half of the grid keeps the test short; all of it passed once
        embeds, mask = padded if s["repetition_penalty"] == 1.0 or model.llm.is_encoder_decoder else unpadded
        lm.generation_config.early_stopping = early
        o = GenerationOptions(max_new_tokens=9, **s)
        want = lm.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, max_new_tokens=9,
                           eos_token_id=eos, pad_token_id=tok.pad_token_id, top_p=None, top_k=None,
                           temperature=None, **s)
        have = decode.decode(lm, embeds, mask, o, eos, tok.pad_token_id)
        assert have.tolist() == want.tolist(), (s, early)
        checked += 1
    lm.generation_config.early_stopping = False
    assert checked >= 60


@pytest.mark.parametrize("fixture", ["tiny_opt_dir", "tiny_t5_dir"])
def test_an_unset_early_stopping_runs_our_loop(fixture, request):
    """transformers 5 leaves `early_stopping` unset (None) in a saved generation_config: it means False, and
    greedy and beam search still take our loop, with generate's tokens."""
    model = load_model(str(request.getfixturevalue(fixture)), "cpu", "float32")
    lm, tok = model.llm.model, model.llm.tokenizer
    assert lm.generation_config.early_stopping is None  # as save_pretrained wrote it
    embeds, mask = _inputs(model, ["a photo of", "a dog"])
    eos = _frequent_tokens(model, embeds, mask)
    for beams in (1, 3):
        o = GenerationOptions(num_beams=beams, max_new_tokens=9)
        assert decode.supported(lm, o)
        want = lm.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, max_new_tokens=9,
                           num_beams=beams, eos_token_id=eos, pad_token_id=tok.pad_token_id, top_p=None, top_k=None,
                           temperature=None)
        assert decode.decode(lm, embeds, mask, o, eos, tok.pad_token_id).tolist() == want.tolist()


@pytest.mark.parametrize("fixture", ["tiny_opt_dir", "tiny_t5_dir"])
def test_unset_early_stopping_runs_our_loop(fixture, request):
    """transformers 5 leaves `early_stopping` unset (None, meaning False) in a saved generation config: captions
    still take our loop, with generate's tokens."""
    model = load_model(str(request.getfixturevalue(fixture)), "cpu", "float32")
    lm = model.llm.model
    assert lm.generation_config.early_stopping is None
    prefix = model.llm_prefix(model.vision_embeds(tiny.pixels(2, seed=3)))
    prompts = ["a photo of", "a dog"]
    for beams in (1, 3):
        o = GenerationOptions(num_beams=beams, max_new_tokens=8, min_new_tokens=2)
        assert decode.supported(lm, o)
        embeds, mask = (model.llm.encoder_inputs(prefix, prompts, truncate=False) if model.llm.is_encoder_decoder
                        else model.llm.decoder_inputs(prefix, prompts))  # fmt: skip
        want = lm.generate(inputs_embeds=embeds, attention_mask=mask, **model.llm._generate_kwargs(o))
        lm.generate = None  # our loop must not call it
        try:
            assert model.llm.generate_tokens(prefix, prompts, o).tolist() == want.tolist()
        finally:
            del lm.generate


def test_beams_continue_in_their_parents_rows():
    """A beam's first child stays in its parent's cache row; later children take the rows of beams that left no
    child, and only those rows are copied. Per-row values come back in rank order, and tokens go in row order."""
    import torch

    slots = decode._Slots(2, 5, "cpu")
    parents = torch.tensor([[0, 0, 1, 3, 3], [4, 3, 2, 1, 0]])  # item 1: every beam one child, reversed ranks
    rows = slots.follow(parents)
    assert rows.tolist() == [0, 1, 0, 3, 3] + [5, 6, 7, 8, 9]  # rows 2 and 4 copy rows 0 and 3; item 1 copies none
    assert slots.slot.tolist() == [[0, 2, 1, 3, 4], [4, 3, 2, 1, 0]]
    per_row = torch.arange(10.0).view(2, 5, 1)  # row r's values = r
    assert slots.ranked(per_row).flatten().tolist() == [0, 2, 1, 3, 4, 9, 8, 7, 6, 5]
    tokens = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])  # by rank
    assert slots.physical(tokens).tolist() == [10, 12, 11, 13, 14, 24, 23, 22, 21, 20]  # by row
    histories = torch.stack((tokens, tokens + 100), dim=2)  # (items, K, steps), by rank
    assert slots.physical(histories).tolist() == [[t, t + 100] for t in slots.physical(tokens).tolist()]
    assert slots.physical(histories[:, :, :0]).shape == (10, 0)  # the first step: no history yet
