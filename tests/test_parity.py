"""Parity with transformers' BLIP-2 on the same weights: checkpoints saved with `save_pretrained`, loaded by
transformers and by our loader. fp32 on CPU: logits within 1e-4, identical greedy and beam-search tokens."""

from __future__ import annotations

import pytest
import torch

from blip2cli.config import GenerationOptions
from blip2cli.model.load import load_model
from tests import tiny

PROMPT = "a photo of"


def _hf(directory, cls_name):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(directory, dtype=torch.float32).eval()


def _hf_inputs(directory, prompts, n_images):
    """[<image> x Q ; BOS prompt], left-padded, as transformers' BLIP-2 processor builds it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    image = tok.convert_tokens_to_ids("<image>")
    rows = [[image] * tiny.Q + tok(p).input_ids for p in prompts] * (n_images // len(prompts))
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_opt_logits_match(tiny_opt_dir):
    hf, ours = _hf(tiny_opt_dir, "Blip2ForConditionalGeneration"), load_model(str(tiny_opt_dir), "cpu", "float32")
    px = tiny.pixels(2)
    ids, mask = _hf_inputs(tiny_opt_dir, [PROMPT], 2)
    with torch.no_grad():
        expected = hf(pixel_values=px, input_ids=ids, attention_mask=mask).logits
        got = ours.llm.prompt_logits(ours.llm_prefix(ours.vision_embeds(px)), [PROMPT, PROMPT])
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("beams", [1, 5])
def test_opt_generation_tokens_match(tiny_opt_dir, beams):
    hf, ours = _hf(tiny_opt_dir, "Blip2ForConditionalGeneration"), load_model(str(tiny_opt_dir), "cpu", "float32")
    px = tiny.pixels(2, seed=3)
    prompts = [PROMPT, "a dog"]  # different lengths: left padding in front of the image slots
    ids, mask = _hf_inputs(tiny_opt_dir, prompts, 2)
    o = GenerationOptions(num_beams=beams, max_new_tokens=12, min_new_tokens=2)
    with torch.no_grad():
        expected = hf.generate(pixel_values=px, input_ids=ids, attention_mask=mask, num_beams=beams,
                               max_new_tokens=12, min_new_tokens=2, do_sample=False)[:, ids.shape[1]:]
        got = ours.llm.generate_tokens(ours.llm_prefix(ours.vision_embeds(px)), prompts, o)
    assert got.tolist() == expected.tolist()


def test_t5_logits_and_tokens_match(tiny_t5_dir):
    hf, ours = _hf(tiny_t5_dir, "Blip2ForConditionalGeneration"), load_model(str(tiny_t5_dir), "cpu", "float32")
    px = tiny.pixels(2, seed=4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    image = tok.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[image] * tiny.Q + tok(PROMPT).input_ids] * 2)
    start = torch.zeros(2, 1, dtype=torch.long)
    with torch.no_grad():
        expected = hf(pixel_values=px, input_ids=ids, decoder_input_ids=start).logits
        got = ours.llm.prompt_logits(ours.llm_prefix(ours.vision_embeds(px)), [PROMPT, PROMPT])
        assert (got - expected).abs().max().item() <= 1e-4
        for beams in (1, 5):
            want = hf.generate(pixel_values=px, input_ids=ids, num_beams=beams, max_new_tokens=10)
            have = ours.llm.generate_tokens(ours.llm_prefix(ours.vision_embeds(px)), [PROMPT, PROMPT],
                                            GenerationOptions(num_beams=beams, max_new_tokens=10))
            assert have.tolist() == want.tolist()


def test_retrieval_itc_and_itm_match(tiny_retrieval_model_dir):
    from transformers import AutoTokenizer

    hf = _hf(tiny_retrieval_model_dir, "Blip2ForImageTextRetrieval")
    ours = load_model(str(tiny_retrieval_model_dir), "cpu", "float32")
    tok = AutoTokenizer.from_pretrained(tiny_retrieval_model_dir)
    texts = ["a man and a chicken", "two cats on a pink blanket"]
    px = tiny.pixels(2, seed=5)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        itc_hf = hf(pixel_values=px, input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits_per_image
        itm_hf = hf(pixel_values=px, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                    use_image_text_matching_head=True).logits_per_image
        embeds = ours.vision_embeds(px)
        itc = (ours.image_features(embeds) @ ours.text_features(texts).T).amax(dim=1)  # max over queries
        itm = ours.itm_logits(embeds, texts)
    assert (itc - itc_hf).abs().max().item() <= 1e-4
    assert (itm - itm_hf).abs().max().item() <= 1e-4
