"""One decoding step of an OPT language model without transformers' per-call machinery, for decode.py.

At a decoding step OPT multiplies a handful of rows by its weights; at one row (greedy, batch 1) the products
take ~22 ms of a ~31 ms step on this 2-core CPU (benchmark model, int8), and the rest is transformers' Python
around them: argument decorators on every layer and attention call, the causal-mask builder, the cache and
attention dispatch. This step runs the same modules (so packed, int8 and bitsandbytes layers all work) and the
same tensor operations in the same order as transformers 5's OPTForCausalLM with sdpa attention
(models/opt/modeling_opt.py, integrations/sdpa_attention.py), so the logits are the same numbers; the prompt
pass stays transformers' own. The decoding tests compare the tokens with `generate` in every setting. One fusion:
a packed fc1 (model/packed.py) applies OPT's ReLU in its own pass over the output (max(x, 0) is exact, so the
numbers are the same), one small op and one wake-up of the threads fewer per layer.

Only for what it covers (`stepper`): OPT in eval mode, sdpa attention, and no accelerate hooks (a model
dispatched over devices by a device map moves its tensors in hooks that a direct module call would still run,
but the cache would not follow): anything else keeps transformers' forward.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from blip2cli.model.kv_cache import BufferedCache
from blip2cli.model.packed import PackedLinear


def stepper(lm: nn.Module) -> OptStep | None:
    """A lean decoding step for `lm`, or None where transformers' forward must run."""
    config = lm.config
    if getattr(config, "model_type", None) != "opt" or lm.training:
        return None
    if getattr(config, "_attn_implementation", None) != "sdpa":  # eager attention rounds differently
        return None
    if any(hasattr(m, "_hf_hook") for m in lm.modules()):
        return None
    return OptStep(lm)


class OptStep:
    """logits = step(tokens, positions, mask, cache): the next-token logits (rows, V) for one new token per row,
    its keys and values written into the cache (which the prompt pass filled); `hidden` stops before the head."""

    def __init__(self, lm: nn.Module) -> None:
        decoder = lm.model.decoder
        self.lm, self.decoder = lm, decoder
        self.heads = lm.config.num_attention_heads
        self.pre_norm = bool(lm.config.do_layer_norm_before)

    def __call__(self, tokens: Tensor, positions: Tensor, mask: Tensor, cache: BufferedCache) -> Tensor:
        return self.lm.lm_head(self.hidden(tokens, positions, mask, cache))

    def hidden(self, tokens: Tensor, positions: Tensor, mask: Tensor, cache: BufferedCache) -> Tensor:
        """The LM head's input (rows, D) for the new tokens; `__call__` multiplies it by the head."""
        d = self.decoder
        rows = tokens.shape[0]
        h = d.embed_tokens(tokens[:, None])  # (rows, 1, word_embed_proj_dim)
        if d.project_in is not None:
            h = d.project_in(h)
        h = h + d.embed_positions(mask, 0, position_ids=positions)
        # transformers passes no mask when nothing is padded, else a boolean one (True: attend); at a decoding step
        # the causal part allows every cached position
        attend = None if bool(mask.all()) else mask.bool()[:, None, None, :]
        for i, layer in enumerate(d.layers):
            h = self._layer(layer, cache.layers[i], h, attend, rows)
        if d.final_layer_norm is not None:
            h = d.final_layer_norm(h)
        if d.project_out is not None:
            h = d.project_out(h)
        return h[:, -1]

    def _layer(self, layer: nn.Module, kv, h: Tensor, attend: Tensor | None, rows: int) -> Tensor:
        a = layer.self_attn
        residual = h
        if self.pre_norm:
            h = layer.self_attn_layer_norm(h)
        # the products are fresh tensors: scaling and residual sums go in place (the same numbers, no allocation)
        q = a.q_proj(h).mul_(a.scaling).view(rows, -1, self.heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(rows, -1, self.heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(rows, -1, self.heads, a.head_dim).transpose(1, 2)
        keys, values = kv.update(k, v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attend, dropout_p=0.0, scale=1.0,
                                             is_causal=False)
        out = out.transpose(1, 2).contiguous().reshape(rows, 1, -1).contiguous()
        h = a.out_proj(out).add_(residual)
        if not self.pre_norm:
            h = layer.self_attn_layer_norm(h)
        shape = h.shape
        h = h.reshape(-1, h.shape[-1])
        residual = h
        if self.pre_norm:
            h = layer.final_layer_norm(h)
        if type(layer.activation_fn) is not nn.ReLU:
            h = layer.fc2(layer.activation_fn(layer.fc1(h)))
        elif type(layer.fc1) is PackedLinear:
            h = layer.fc2(layer.fc1.relu(h))  # oneDNN's ReLU post-op: the same numbers, one pass fewer
        else:
            h = layer.fc2(layer.fc1(h).relu_())
        h = h.add_(residual).view(shape)
        if not self.pre_norm:
            h = layer.final_layer_norm(h)
        return h

