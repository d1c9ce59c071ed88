"""The lean OPT decoding step (model/opt_step.py) against transformers' own forward on the same cache state: the
same logits, bit for bit, for pre- and post-norm OPT (OPT-350m projects in and out and normalises after), with
and without left padding; and the cases it must leave to transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

from blip2cli.model import opt_step, packed
from blip2cli.model.decode import _cache_arg
from blip2cli.model.kv_cache import BufferedCache


def _opt(attn: str = "sdpa", **kw) -> OPTForCausalLM:
    torch.manual_seed(0)
    config = OPTConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=kw.pop("proj", 32), **kw)
    config._attn_implementation = attn
    return OPTForCausalLM(config).eval()


def _prompt(lm, mask: torch.Tensor, new: int) -> tuple[BufferedCache, torch.Tensor]:
    rows, length = mask.shape
    embeds = torch.randn(rows, length, lm.config.word_embed_proj_dim, generator=torch.Generator().manual_seed(1))
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = BufferedCache(new)
    lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, **_cache_arg(lm, cache), use_cache=True)
    return cache, pos


@pytest.mark.parametrize("kw", [{}, dict(do_layer_norm_before=False, proj=16)], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("pack", [False, True], ids=["stored", "packed"])
@torch.no_grad()
def test_same_logits_as_transformers(kw, padded, pack):
    """Packed (model/packed.py), the step fuses fc1's ReLU into the product; transformers' forward applies it apart."""
    lm = _opt(**kw)
    if pack:
        if not packed.available(torch.device("cpu")):
            pytest.skip("this torch has no oneDNN packing")
        assert packed.pack_linears(lm) > 0
    step = opt_step.stepper(lm)
    assert step is not None
    mask = torch.ones(3, 6, dtype=torch.long)
    if padded:
        mask[1, :2] = 0
        mask[2, :5] = 0
    ours, pos = _prompt(lm, mask, 4)
    theirs, _ = _prompt(lm, mask, 4)
    tokens = torch.tensor([5, 17, 60])
    for _ in range(4):
        mask = torch.cat((mask, mask.new_ones(3, 1)), dim=1)
        pos = pos[:, -1:] + 1
        have = step(tokens, pos, mask, ours)
        want = lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos,
                  **_cache_arg(lm, theirs), use_cache=True).logits[:, -1]
        assert torch.equal(have, want)
        tokens = want.argmax(-1)
    assert ours.get_seq_length() == theirs.get_seq_length() == 10


def test_transformers_forward_where_the_step_does_not_apply():
    assert opt_step.stepper(_opt(attn="eager")) is None  # eager attention rounds differently from sdpa
    assert opt_step.stepper(_opt().train()) is None
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=8)).eval()
    assert opt_step.stepper(t5) is None
    hooked = _opt()
    hooked.model.decoder.layers[0]._hf_hook = object()  # as accelerate's dispatch leaves a device-mapped model
    assert opt_step.stepper(hooked) is None
