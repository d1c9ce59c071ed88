"""BufferedCache against transformers' DynamicCache: the same keys and values after a prompt, beams, beam
reorders, new tokens and dropped rows (decoding itself is checked against generate in test_decode.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from blip2cli.model.kv_cache import BufferedCache

B, K, P, D = 2, 3, 5, 8  # items, beams, prompt positions, head dim


def _kv(g: torch.Generator, rows: int, heads: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, heads, n, D, generator=g), torch.randn(rows, heads, n, D, generator=g)


@pytest.mark.parametrize("heads", [(4, 4, 4), (4, 2, 4)], ids=["merged", "per-layer"])
def test_same_keys_and_values_as_dynamic_cache(heads):
    g = torch.Generator().manual_seed(0)
    ours, ref = BufferedCache(extra=5), DynamicCache()
    for layer, h in enumerate(heads):
        k, v = _kv(g, B, h, P)
        ours.update(k, v, layer)
        ref.update(k, v, layer)
    ours.batch_repeat_interleave(K)
    ref.batch_repeat_interleave(K)
    assert (ours.merged is not None) == (len(set(heads)) == 1)  # one tensor when the layers' shapes agree
    groups = torch.arange(B).repeat_interleave(K) * K
    for step in range(4):
        parents = torch.randint(0, K, (B * K,), generator=g) + groups  # a beam of the same item
        ours.reorder_beams(parents)
        ref.reorder_cache(parents)
        for layer, h in enumerate(heads):
            k, v = _kv(g, B * K, h, 1)
            for a, b in zip(ours.update(k, v, layer), ref.update(k, v, layer)):
                assert torch.equal(a, b), (step, layer)
    keep = torch.tensor([0, 4, 5])  # greedy drops finished rows: any rows, in any order
    ours.batch_select_indices(keep)
    ref.batch_select_indices(keep)
    for layer, h in enumerate(heads):
        k, v = _kv(g, len(keep), h, 1)
        for a, b in zip(ours.update(k, v, layer), ref.update(k, v, layer)):
            assert torch.equal(a, b)
    assert ours.get_seq_length() == ref.get_seq_length() == P + 5


def test_reorder_moves_only_generated_positions():
    g = torch.Generator().manual_seed(1)
    cache = BufferedCache(extra=2)
    cache.update(*_kv(g, B, 4, P), 0)
    cache.batch_repeat_interleave(K)
    cache.update(*_kv(g, B * K, 4, 1), 0)
    keys = cache.layers[0].keys
    keys[:, :, :P] = torch.arange(B * K, dtype=keys.dtype)[:, None, None, None]  # mark each row's prompt part
    prompt, generated = keys[:, :, :P].clone(), keys[:, :, P].clone()
    parents = torch.tensor([2, 2, 0, 3, 5, 4])
    cache.reorder_beams(parents)
    assert torch.equal(cache.layers[0].keys[:, :, :P], prompt)  # shared by the beams: left in place
    assert torch.equal(cache.layers[0].keys[:, :, P], generated[parents])  # rows that swap: read before written
    generated = cache.layers[0].keys[:, :, P].clone()
    parents = torch.tensor([0, 0, 2, 3, 3, 5])  # as decode places beams: no row written is read
    cache.reorder_beams(parents)
    assert torch.equal(cache.layers[0].keys[:, :, P], generated[parents])


def test_full_cache_says_so():
    g = torch.Generator().manual_seed(2)
    cache = BufferedCache(extra=1)
    cache.update(*_kv(g, B, 4, P), 0)
    cache.update(*_kv(g, B, 4, 1), 0)
    with pytest.raises(RuntimeError, match="KV cache full: 6 positions reserved, 7 needed"):
        cache.update(*_kv(g, B, 4, 1), 0)
