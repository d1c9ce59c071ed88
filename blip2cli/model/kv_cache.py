"""A KV cache for our decoding loop (decode.py): transformers' DynamicCache with the copies taken out.

DynamicCache concatenates each step's keys and values onto the whole cache, and beam search then gathers the
whole cache again for the surviving beams: two copies of every cached position per layer and step. Here

- each layer's keys and values live in one buffer allocated for the whole decode (prompt + `extra` new tokens);
  a step writes its token in place, and attention reads a view of the filled part, as long as DynamicCache's;
- after `batch_repeat_interleave(k)` the positions cached so far (queries and prompt) are the same in the k
  beams of an item, and a beam's parent is always a beam of the same item, so `reorder_beams` moves only the
  positions written since: the generated tokens, not the 32 queries and the prompt (T5: not the encoder's
  cross-attention keys at all), and only for the rows whose beam's parent sat in another row (decode.py keeps
  most beams in their parent's row);
- `batch_repeat_interleave` also puts all layers' buffers in one tensor, so that a reorder is one gather and one
  copy for the whole cache rather than two per layer and tensor: on a shared CPU each small op costs a thread
  wake-up, whatever its size.

The attention sees the same keys and values, in the same shapes, as with DynamicCache: the same logits.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


def _copy_rows(tail: Tensor, dim: int, beam_idx: Tensor) -> None:
    """Row i of `tail` (along `dim`) takes row beam_idx[i]; only the rows whose parent is another row are written
    (decode.py places beams so that most continue in their own row). Row by row: a slice copy per row runs at
    memory speed where one gather and index_put over a strided view ran 2-3x slower. decode.py's placement never
    writes a row that another one reads (a parent's row keeps its first child), so the rows copy straight across;
    where a row is both, the sources are read first."""
    targets = (beam_idx != torch.arange(len(beam_idx), device=beam_idx.device)).nonzero().squeeze(1).tolist()
    if not targets:
        return
    sources = beam_idx[targets].tolist()
    if set(sources) & set(targets):
        reads = [tail.select(dim, i).clone() for i in sources]
    else:
        reads = [tail.select(dim, i) for i in sources]
    for i, rows in zip(targets, reads):
        tail.select(dim, i).copy_(rows)


class BufferedLayer(DynamicLayer):
    """One attention layer's keys and values (rows, heads, positions, head_dim) in a preallocated buffer."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra  # positions to reserve beyond the first write (the new tokens)
        self.length = 0  # positions written
        self.shared = 0  # positions [0, shared) are equal in all beams of an item (see batch_repeat_interleave)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self._keys = self._empty(key_states, key_states.shape[-2] + self.extra)
        self._values = self._empty(value_states, value_states.shape[-2] + self.extra)
        self.is_initialized = True

    @staticmethod
    def _empty(like: Tensor, capacity: int) -> Tensor:
        rows, heads, _, dim = like.shape
        return like.new_empty(rows, heads, capacity, dim)

    def _view(self) -> None:
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._keys.shape[-2]:
            raise RuntimeError(f"KV cache full: {self._keys.shape[-2]} positions reserved, {end} needed")
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row becomes `repeats` beams; what is cached so far is shared by them."""
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._view()
        self.shared = self.length

    def _take(self, keys: Tensor, values: Tensor) -> None:
        """Use these buffers (views of the cache's merged tensor) from now on."""
        self._keys, self._values = keys, values
        self._view()

    def reorder_beams(self, beam_idx: Tensor) -> None:
        """Row i takes row beam_idx[i]'s cache, beam_idx[i] being a beam of the same item as i."""
        if self.length > self.shared:
            for buffer in (self._keys, self._values):
                _copy_rows(buffer[:, :, self.shared : self.length], 0, beam_idx)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        """Any rows, in any order (greedy decoding drops finished rows): the whole buffer is gathered."""
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._view()
        self.shared = 0

    def reset(self) -> None:
        super().reset()
        self.length = self.shared = 0

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)  # checks the argument, shortens the views
        if self.is_initialized:
            self.length = self.keys.shape[-2]
            self.shared = min(self.shared, self.length)


class BufferedCache(DynamicCache):
    """A DynamicCache (so EncoderDecoderCache accepts it) whose layers are `BufferedLayer`s."""

    def __init__(self, extra: int) -> None:
        Cache.__init__(self, layer_class_to_replicate=partial(BufferedLayer, extra))
        self.merged: Tensor | None = None  # (layers, 2, rows, heads, positions, head_dim): every layer's buffers

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row becomes `repeats` beams, and the layers' buffers one tensor (when their shapes agree)."""
        layers = self.layers
        if not layers or not all(layer.is_initialized for layer in layers):
            return super().batch_repeat_interleave(repeats)
        shapes = {(layer._keys.shape, layer._values.shape, layer.length) for layer in layers}
        if len(shapes) > 1 or layers[0]._keys.shape != layers[0]._values.shape:
            return super().batch_repeat_interleave(repeats)
        rows, heads, capacity, dim = layers[0]._keys.shape
        filled = layers[0].length
        self.merged = layers[0]._keys.new_empty(len(layers), 2, rows * repeats, heads, capacity, dim)
        for layer, buffers in zip(layers, self.merged):  # the filled positions only, each row into its beams' rows
            for source, target in zip((layer._keys, layer._values), buffers):
                target[:, :, :filled].unflatten(0, (rows, repeats)).copy_(source[:, None, :, :filled])
        for layer, buffers in zip(layers, self.merged):
            layer._take(buffers[0], buffers[1])
            layer.shared = layer.length

    def reorder_beams(self, beam_idx: Tensor) -> None:
        if self.merged is None:
            for layer in self.layers:
                layer.reorder_beams(beam_idx)
            return
        shared, length = self.layers[0].shared, self.layers[0].length
        if length > shared:
            _copy_rows(self.merged[:, :, :, :, shared:length], 2, beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.merged = None  # the layers gather their own buffers again
        super().batch_select_indices(indices)
