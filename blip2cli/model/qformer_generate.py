"""Captioning with the Q-Former alone (stage-1 models, BLIP-2 paper §3.1 ITG): [DEC] starts, [SEP] ends, the
text attends to the cached query keys/values. LAVIS's `Blip2Qformer.generate` settings: 3 beams, at most 30
tokens, at least 10, both counting [DEC].

Greedy and beam search are the LLM's (`model.decode`: transformers' rules, one implementation); the Q-Former is
one more `Runner` under them. Sampling is done here (the LLM samples through transformers' `generate`)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from blip2cli.config import GenerationOptions
from blip2cli.model import decode
from blip2cli.model.qformer import QueryCache

if TYPE_CHECKING:  # Blip2 calls us: a type only, never imported at run time
    from blip2cli.model.blip2 import Blip2


class QFormerRunner(decode.Runner):
    """Rows of [DEC] + generated tokens over each image's cached query keys/values; the text side has no cache
    of its own, so each step re-reads the (short) sequence."""

    def __init__(self, model: Blip2, cache: QueryCache) -> None:
        self.model, self.cache = model, cache
        self.prompt_len, self.start = 1, model.tokenizer.bos_token_id  # [DEC] is part of the output
        rows = cache.layers[0][0].shape[0]
        self.seqs = torch.full((rows, 1), self.start, dtype=torch.long, device=model.device)
        self._run()

    def _run(self) -> None:
        hidden, _ = self.model.qformer.decode_text(self.seqs, torch.ones_like(self.seqs), self.cache)
        self.logits = self.model.qformer.lm_logits(hidden[:, -1]).float()  # (R, V)

    def repeat(self, k: int) -> None:
        self.cache, self.seqs, self.logits = self.cache.expand(k), self.seqs.repeat_interleave(k, 0), \
            self.logits.repeat_interleave(k, 0)  # fmt: skip

    def reorder(self, parents: Tensor) -> None:  # the query keys/values are the same in the beams of an image
        self.seqs = self.seqs[parents]

    def select(self, rows: Tensor) -> None:
        self.cache = QueryCache([(k[rows], v[rows]) for k, v in self.cache.layers])
        self.seqs, self.logits = self.seqs[rows], self.logits[rows]

    def step(self, tokens: Tensor) -> None:
        self.seqs = torch.cat((self.seqs, tokens[:, None]), dim=1)
        self._run()


def _top_p_sample(logprobs: Tensor, top_p: float) -> Tensor:
    probs = logprobs.exp()
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_p, 1)
    return order.gather(1, choice).squeeze(1)


def _sample(run: QFormerRunner, o: GenerationOptions, sep: int, pad: int) -> Tensor:
    """Nucleus sampling, num_return_sequences rows per image; rows are padded after [SEP]."""
    run.repeat(o.num_return_sequences)
    done = torch.zeros(run.seqs.shape[0], dtype=torch.bool, device=run.seqs.device)
    eos = torch.tensor([sep], device=run.seqs.device)
    for step in range(o.max_new_tokens):
        logits = decode.penalise(run.logits, run.seqs, o.repetition_penalty)
        logits = decode.block_eos(logits, eos, step, o.min_new_tokens)
        nxt = _top_p_sample(torch.log_softmax(logits / o.temperature, dim=-1), o.top_p)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        done |= nxt == sep
        if done.all() or step + 1 == o.max_new_tokens:
            return torch.cat((run.seqs, nxt[:, None]), dim=1)
        run.step(nxt)
    return run.seqs


@torch.no_grad()
def qformer_generate(model: Blip2, embeds: Tensor, o: GenerationOptions) -> list[list[str]]:
    if model.tokenizer is None or model.qformer.cls is None:
        raise ValueError("this model has neither a language model nor a Q-Former text head: it cannot caption")
    if model.fresh_itg_head:
        warnings.warn("this Hugging Face checkpoint has no trained ITG head (the format has no place for it): "
                      "Q-Former captions will be noise; use the LAVIS stage-1 file or a model exported by blip2cli",
                      stacklevel=2)  # fmt: skip
    _, cache = model.query_image(embeds)
    sep, pad = model.tokenizer.sep_token_id, model.tokenizer.pad_token_id
    run = QFormerRunner(model, cache)
    with torch.inference_mode():
        if o.do_sample:
            rows = _sample(run, o, sep, pad)
        elif o.num_beams == 1:
            rows = decode.greedy(run, o, torch.tensor([sep], device=model.device), pad)
        else:  # LAVIS runs transformers' beam search with early_stopping False
            rows = decode.beam_search(run, o, torch.tensor([sep], device=model.device), pad, False)
    n = o.num_return_sequences  # rows per image, in image order
    texts = model.tokenizer.batch_decode(rows[:, 1:], skip_special_tokens=True)
    return [[t.strip() for t in texts[b * n : (b + 1) * n]] for b in range(embeds.shape[0])]
