"""Captioning with the Q-Former alone (stage-1 models, spec §4.4): [DEC] starts, [SEP] ends, the text attends
to the cached query keys/values. LAVIS's settings: beams 3, at most 30 tokens, at least 10."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from blip2cli.config import GenerationOptions
from blip2cli.model.qformer import QueryCache

if TYPE_CHECKING:
    from blip2cli.model.blip2 import Blip2


def _next_logprobs(model: Blip2, seqs: Tensor, cache: QueryCache, step: int, o: GenerationOptions) -> Tensor:
    """log p(next token | image, seqs) for every row, with min-length and repetition rules applied."""
    hidden, _ = model.qformer.decode_text(seqs, torch.ones_like(seqs), cache)
    logits = model.qformer.lm_logits(hidden[:, -1]).float()  # (R, V)
    if o.repetition_penalty != 1.0:
        seen = logits.gather(1, seqs)
        logits.scatter_(1, seqs, torch.where(seen > 0, seen / o.repetition_penalty, seen * o.repetition_penalty))
    if step < o.min_new_tokens:
        logits[:, model.tokenizer.sep_token_id] = float("-inf")
    if o.do_sample:
        logits = logits / o.temperature
    return torch.log_softmax(logits, dim=-1)


def _top_p_sample(logprobs: Tensor, top_p: float) -> Tensor:
    probs = logprobs.exp()
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_p, 1)
    return order.gather(1, choice).squeeze(1)


def _sample(model: Blip2, cache: QueryCache, B: int, o: GenerationOptions) -> Tensor:
    n = o.num_return_sequences
    cache = cache.expand(n)
    seqs = torch.full((B * n, 1), model.tokenizer.bos_token_id, device=model.device)
    done = torch.zeros(B * n, dtype=torch.bool, device=model.device)
    sep, pad = model.tokenizer.sep_token_id, model.tokenizer.pad_token_id
    for step in range(o.max_new_tokens):
        lp = _next_logprobs(model, seqs, cache, step, o)
        nxt = _top_p_sample(lp, o.top_p) if o.do_sample else lp.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        seqs = torch.cat((seqs, nxt[:, None]), dim=1)
        done |= nxt == sep
        if done.all():
            break
    return seqs


def _beam(model: Blip2, cache: QueryCache, B: int, o: GenerationOptions) -> list[list[Tensor]]:
    """Plain beam search; finished hypotheses scored by sum log p / length ** length_penalty."""
    K, sep = o.num_beams, model.tokenizer.sep_token_id
    cache = cache.expand(K)
    seqs = torch.full((B * K, 1), model.tokenizer.bos_token_id, device=model.device)
    scores = torch.zeros(B, K, device=model.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand from the first only
    finished: list[list[tuple[float, Tensor]]] = [[] for _ in range(B)]
    for step in range(o.max_new_tokens):
        lp = _next_logprobs(model, seqs, cache, step, o)  # (B*K, V)
        V = lp.shape[-1]
        cand = (scores[:, :, None] + lp.view(B, K, V)).view(B, K * V)
        top, idx = cand.topk(2 * K, dim=1)
        new_seqs, new_scores = [], []
        for b in range(B):
            keep = []
            for s, i in zip(top[b].tolist(), idx[b].tolist()):
                beam, tok = divmod(i, V)
                seq = torch.cat((seqs[b * K + beam], seqs.new_tensor([tok])))
                if tok == sep or step == o.max_new_tokens - 1:
                    length = seq.shape[0] - 1
                    finished[b].append((s / max(length, 1) ** o.length_penalty, seq))
                else:
                    keep.append((s, seq))
                if len(keep) == K:
                    break
            while len(keep) < K:  # pad with dead beams
                keep.append((float("-inf"), keep[0][1] if keep else seqs[b * K]))
            new_seqs += [s for _, s in keep]
            new_scores.append(torch.tensor([s for s, _ in keep], device=model.device))
        width = max(s.shape[0] for s in new_seqs)
        seqs = torch.stack([torch.cat((s, s.new_full((width - s.shape[0],), sep))) for s in new_seqs])
        scores = torch.stack(new_scores)
        if all(len(f) >= K and max(x[0] for x in f) >= scores[b].max().item() for b, f in enumerate(finished)):
            break
    return [[seq for _, seq in sorted(f, key=lambda x: -x[0])[: o.num_return_sequences]] for f in finished]


@torch.no_grad()
def qformer_generate(model: Blip2, embeds: Tensor, o: GenerationOptions) -> list[list[str]]:
    if model.tokenizer is None or model.qformer.cls is None:
        raise ValueError("this model has neither a language model nor a Q-Former text head: it cannot caption")
    if model.fresh_itg_head:
        import warnings

        warnings.warn("this Hugging Face checkpoint has no trained ITG head (the format has no place for it): "
                      "Q-Former captions will be noise; use the LAVIS stage-1 file or a model exported by blip2cli",
                      stacklevel=2)
    _, cache = model.query_image(embeds)
    B = embeds.shape[0]
    if o.do_sample or o.num_beams == 1:
        rows = _sample(model, cache, B, o)
        groups = [[rows[b * o.num_return_sequences + i] for i in range(o.num_return_sequences)] for b in range(B)]
    else:
        groups = _beam(model, cache, B, o)
    decode = model.tokenizer.decode
    return [[decode(seq[1:], skip_special_tokens=True).strip() for seq in group] for group in groups]
