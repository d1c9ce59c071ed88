"""Greedy decoding's argmax over the fp32 LM head, found by screening with an int8 copy of it.

The LM head stays in full precision (the issue's and transformers' rule: it decides the tokens), but at one row
its product is the largest single read of an int8 model's decoding step: 154 MB of the benchmark model's 239 MB
(50272 x 768 fp32; 6.2 ms of ~18 on 2 cores, int8 layers ~7). Greedy decoding needs only the argmax, so:

1. int8 logits y~ for every token, with a proven bound e on |y~ - y| per token (Int8Linear.bounded), where y
   is what the fp32 head computes: 38.6 MB read, 2.4 ms;
2. the scores' transform (repetition penalty, blocked EOS; monotone in each score) applied to y~ - e and
   y~ + e gives each token's interval; a token whose upper end is below the best lower end cannot be the
   argmax, and the rest (a few dozen to a few hundred tokens) are the candidates;
3. the candidates' logits in fp32 from the head's own rows, transformed, and their argmax.

The token is the argmax of the fp32 logits, as the full product gives it (a tie closer than fp32 rounding aside,
as with any change in the order of the sums). Where the bound is too loose to screen (more than `MAX_SHARE` of
the vocabulary left), the full fp32 product runs. Costs V x D bytes of int8 beside the fp32 head: only int8
models that decode with our loop build it (FrozenLLM), and beam search, which needs every log-probability,
keeps the full product.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from blip2cli.model import int8_linear

MAX_SHARE = 1 / 16  # candidates beyond this share of the vocabulary: the full product is cheaper


class ScreenedHead:
    """`pick(hidden, transform)`: argmax over transform(hidden @ W^T + b) for the fp32 head (W, b)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight, self.bias = weight, bias  # the head's own fp32 tensors, not copies
        with torch.no_grad():
            self.int8 = int8_linear.from_weight(weight, None if bias is None else bias.detach())

    def logits(self, hidden: Tensor) -> Tensor:
        """The full fp32 product (rows, V)."""
        return F.linear(hidden, self.weight, self.bias)

    def pick(self, hidden: Tensor, transform: Callable[[Tensor], Tensor]) -> Tensor:
        """Tokens (rows,) for hidden states (rows, D); `transform` maps scores (rows, V) to scores and must be
        monotone non-decreasing in each score (the repetition penalty and EOS blocking are)."""
        approx, bound = self.int8.bounded(hidden)
        low, high = transform(approx - bound), transform(approx + bound)
        best_low = low.max(dim=-1, keepdim=True).values
        candidates = (high >= best_low).any(dim=0).nonzero().squeeze(1)  # for any row: one product for all rows
        if not 0 < len(candidates) <= MAX_SHARE * approx.shape[-1]:  # none: NaN in the hidden states
            return transform(self.logits(hidden)).argmax(-1)
        rows = self.weight.index_select(0, candidates)
        exact = F.linear(hidden, rows, None if self.bias is None else self.bias.index_select(0, candidates))
        scores = approx.new_full(approx.shape, float("-inf"))
        scores[:, candidates] = exact
        return transform(scores).argmax(-1)


def for_lm(lm) -> ScreenedHead | None:
    """A screened head for `lm` where its head's weight is a plain fp32 tensor on a CPU with fbgemm's int8 kernels
    (a head packed for beam search reads OPT's tied input embeddings). The head's parameters themselves are held:
    a later change of their layout (model/packed.py) is seen, and nothing is copied."""
    head = lm.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if (weight is None or weight.is_mkldnn) and getattr(lm.config, "tie_word_embeddings", False):
        weight = lm.get_input_embeddings().weight
    if (weight is None or weight.is_mkldnn or weight.dtype != torch.float32 or weight.device.type != "cpu"
            or not int8_linear.available()):
        return None
    return ScreenedHead(weight, getattr(head, "bias", None))
