"""Greedy and beam-search decoding for the frozen LLM, token-for-token what transformers' `generate` returns for
the same inputs, with less work:

- the prompt ([queries ; BOS prompt]) is run once per image and its KV cache repeated for the beams, where
  `generate` runs it once per beam;
- the KV cache is preallocated for the whole decode and written in place, and reordering beams moves only the
  generated positions, the prompt's being the same in all beams of an image (kv_cache.py), where `generate`
  concatenates and gathers the whole cache at every step;
- greedy decoding drops finished rows from the batch instead of computing padding;
- no autograd bookkeeping (inference mode), and no per-step logits-processor machinery;
- OPT's decoding steps skip transformers' per-call Python (opt_step.py: the same operations, the same logits);
- an int8 model's greedy argmax over its fp32 head is screened in int8 (screened_head.py: the same tokens).

The repetition penalty covers every generated token (and T5's start token). transformers 5, given inputs_embeds
only, skips as many generated tokens of a row as its prompt has left padding (it reads that count from the
attention mask); with the paper's penalty of 1.0 nothing differs.

Beam search keeps transformers' rules (v4.50+ vectorised beam search): the top 2K continuations by accumulated
log-probability (found per beam first, then among the beams' best: the same set), finished hypotheses scored by
sum log p / length ** length_penalty, the "early_stopping=False" heuristic for stopping, EOS and max-length as
stopping criteria. Sampling and unusual generation configs go to
`generate` itself (see `supported`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from blip2cli.config import GenerationOptions
from blip2cli.model import opt_step
from blip2cli.model.kv_cache import BufferedCache
from blip2cli.model.screened_head import ScreenedHead

NEG = -1.0e9  # transformers' "impossible" score


def supported(lm, o: GenerationOptions) -> bool:
    """Our loop covers greedy and beam search with the options we expose; anything else goes to `generate`."""
    g = lm.generation_config
    exotic = (g.no_repeat_ngram_size, g.bad_words_ids, g.forced_bos_token_id, g.forced_eos_token_id,
              g.suppress_tokens, g.begin_suppress_tokens, g.sequence_bias, g.diversity_penalty,
              g.encoder_repetition_penalty not in (None, 1.0), g.exponential_decay_length_penalty,
              g.renormalize_logits, g.min_length not in (None, 0))
    return not o.do_sample and not any(exotic) and stopping_rule(lm) in (False, True, "never")


def stopping_rule(lm) -> bool | str:
    """The model's beam-search stopping rule; unset (transformers 5's default config) means False."""
    rule = lm.generation_config.early_stopping
    return False if rule is None else rule


# ---------------------------------------------------------------------------------------------------------------
# One forward step of the LM, for decoder-only and encoder-decoder models


class Runner:
    """Holds the KV cache and masks of the rows being decoded; `logits` are the next-token logits (rows, V)."""

    prompt_len: int  # tokens of the decoder's own prompt in the output (T5: the start token)
    logits: Tensor

    def repeat(self, k: int) -> None:
        """Each row becomes k beams (rows i*k .. i*k+k-1)."""
        raise NotImplementedError

    def reorder(self, parents: Tensor) -> None:
        """Beam search: row i continues row parents[i], a beam of the same item (runners may skip what the beams
        of an item share). `step` follows, so the logits need not move."""
        self.select(parents)

    def select(self, rows: Tensor) -> None:
        """Keep these rows only (greedy: finished rows leave)."""
        raise NotImplementedError

    def step(self, tokens: Tensor) -> None:
        raise NotImplementedError

    def pick(self, transform: Callable[[Tensor], Tensor]) -> Tensor:
        """Greedy's next tokens (rows,): the argmax of transform(logits)."""
        return transform(self.logits).argmax(-1)


def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _cache_arg(lm, cache) -> dict:
    """transformers 5.24 renamed `past_key_values` to `cache`."""
    return {"cache" if _accepts(lm.forward, "cache") else "past_key_values": cache}


class _DecoderOnly(Runner):
    def __init__(self, lm, embeds: Tensor, mask: Tensor, new_tokens: int, head: ScreenedHead | None = None) -> None:
        self.lm, self.prompt_len = lm, 0
        self.mask = mask
        self.pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate derives them
        self.use_pos = _accepts(lm.forward, "position_ids")
        self.cache = BufferedCache(new_tokens)
        self.cache_kw = _cache_arg(lm, self.cache)
        extra = {"logits_to_keep": 1} if _accepts(lm.forward, "logits_to_keep") else {}
        self._run(dict(inputs_embeds=embeds, **extra), self.pos)
        self.lean = opt_step.stepper(lm)  # decoding steps without transformers' per-call Python (OPT)
        self.head = head if self.lean is not None else None  # greedy with an int8 screen (screened_head.py)
        self.hidden: Tensor | None = None  # the head's input, where the head runs in `pick`

    def _run(self, inputs: dict, pos: Tensor) -> None:
        if self.use_pos:
            inputs["position_ids"] = pos
        out = self.lm(**inputs, attention_mask=self.mask, **self.cache_kw, use_cache=True)
        self.logits = out.logits[:, -1].float()

    def pick(self, transform: Callable[[Tensor], Tensor]) -> Tensor:
        if self.hidden is None:  # the prompt pass: transformers' forward gave the logits
            return super().pick(transform)
        return self.head.pick(self.hidden, transform)

    def repeat(self, k: int) -> None:
        self.cache.batch_repeat_interleave(k)
        self.mask, self.pos = self.mask.repeat_interleave(k, 0), self.pos.repeat_interleave(k, 0)
        self.logits = self.logits.repeat_interleave(k, 0)

    def reorder(self, parents: Tensor) -> None:  # mask and positions are the same in the beams of an item
        self.cache.reorder_beams(parents)

    def select(self, rows: Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.pos = self.mask[rows], self.pos[rows]
        if self.hidden is not None:
            self.hidden = self.hidden[rows]
        else:
            self.logits = self.logits[rows]

    def step(self, tokens: Tensor) -> None:
        self.mask = torch.cat((self.mask, self.mask.new_ones(self.mask.shape[0], 1)), dim=1)
        self.pos = self.pos[:, -1:] + 1
        if self.head is not None:
            self.hidden, self.logits = self.lean.hidden(tokens, self.pos, self.mask, self.cache), None
        elif self.lean is not None:
            self.logits = self.lean(tokens, self.pos, self.mask, self.cache).float()
        else:
            self._run(dict(input_ids=tokens[:, None]), self.pos)


class _EncoderDecoder(Runner):
    def __init__(self, lm, embeds: Tensor, mask: Tensor, new_tokens: int) -> None:
        from transformers import EncoderDecoderCache

        self.lm, self.prompt_len = lm, 1
        self.mask = mask
        self.encoded = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
        self.self_cache, self.cross_cache = BufferedCache(new_tokens), BufferedCache(0)
        self.cache = EncoderDecoderCache(self.self_cache, self.cross_cache)
        self.cache_kw = _cache_arg(lm, self.cache)
        self.start = lm.generation_config.decoder_start_token_id
        if self.start is None:
            self.start = lm.config.decoder_start_token_id
        self.step(torch.full((embeds.shape[0],), self.start, dtype=torch.long, device=embeds.device))

    def repeat(self, k: int) -> None:
        self.cache.batch_repeat_interleave(k)
        self.mask, self.logits = self.mask.repeat_interleave(k, 0), self.logits.repeat_interleave(k, 0)
        self.encoded.last_hidden_state = self.encoded.last_hidden_state.repeat_interleave(k, 0)

    def reorder(self, parents: Tensor) -> None:  # the encoder's outputs are the same in the beams of an item
        self.self_cache.reorder_beams(parents)
        self.cross_cache.reorder_beams(parents)

    def select(self, rows: Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask, self.logits = self.mask[rows], self.logits[rows]
        self.encoded.last_hidden_state = self.encoded.last_hidden_state[rows]

    def step(self, tokens: Tensor) -> None:
        out = self.lm(encoder_outputs=self.encoded, attention_mask=self.mask, decoder_input_ids=tokens[:, None],
                      **self.cache_kw, use_cache=True)
        self.logits = out.logits[:, -1].float()


def runner(lm, embeds: Tensor, mask: Tensor, new_tokens: int, head: ScreenedHead | None = None) -> Runner:
    """The prompt run; the cache holds `new_tokens` more positions without reallocating. `head`: greedy's
    screened argmax (decoder-only models that take opt_step's lean step)."""
    if lm.config.is_encoder_decoder:
        return _EncoderDecoder(lm, embeds, mask, new_tokens)
    return _DecoderOnly(lm, embeds, mask, new_tokens, head)


# ---------------------------------------------------------------------------------------------------------------
# Scores


def penalise(scores: Tensor, history: Tensor, penalty: float) -> Tensor:
    """transformers' repetition penalty: seen tokens' scores divided (positive) or multiplied (negative)."""
    if penalty == 1.0 or history.shape[1] == 0:
        return scores
    seen = scores.gather(1, history)
    return scores.scatter(1, history, torch.where(seen < 0, seen * penalty, seen / penalty))


def block_eos(scores: Tensor, eos: Tensor, step: int, min_new: int, in_place: bool = False) -> Tensor:
    """EOS impossible before `min_new` new tokens; `in_place` where `scores` are the caller's own to change."""
    if step < min_new:
        scores = scores if in_place else scores.clone()
        scores[:, eos] = float("-inf")
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Greedy


@torch.inference_mode()
def greedy(run: Runner, o: GenerationOptions, eos: Tensor, fill: int) -> Tensor:
    """Argmax decoding; a row stops at EOS (later positions get `fill`), finished rows leave the batch."""
    rows = run.logits.shape[0]
    device = run.logits.device
    out = torch.full((rows, o.max_new_tokens), fill, dtype=torch.long, device=device)
    active = torch.arange(rows, device=device)
    history = torch.empty(rows, 0, dtype=torch.long, device=device)
    if run.prompt_len:  # T5: the start token is part of what the penalty sees
        history = torch.full((rows, 1), run.start, dtype=torch.long, device=device)
    length = 0
    for step in range(o.max_new_tokens):
        tokens = run.pick(lambda s: block_eos(penalise(s, history, o.repetition_penalty), eos, step, o.min_new_tokens))
        out[active, step] = tokens
        history = torch.cat((history, tokens[:, None]), dim=1)
        length = step + 1
        done = torch.isin(tokens, eos)
        if step + 1 == o.max_new_tokens or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            active, history, tokens = active[keep], history[keep], tokens[keep]
            run.select(keep)
        run.step(tokens)
    return _with_prompt(run, out[:, :length])


def _with_prompt(run: Runner, tokens: Tensor) -> Tensor:
    if not run.prompt_len:
        return tokens
    return torch.cat((tokens.new_full((tokens.shape[0], 1), run.start), tokens), dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Beam search


@dataclass
class _Beams:
    """Running and finished hypotheses of B items x K beams; sequences hold generated tokens only."""

    running: Tensor  # (B, K, T)
    running_scores: Tensor  # (B, K)
    finished: Tensor  # (B, K, T)
    finished_scores: Tensor  # (B, K)
    finished_len: Tensor  # (B, K)
    is_finished: Tensor  # (B, K)
    open: Tensor  # (B, 1): can running beams still beat the finished ones?

    @classmethod
    def start(cls, B: int, K: int, T: int, fill: int, device) -> _Beams:
        running = torch.full((B, K, T), fill, dtype=torch.long, device=device)
        scores = torch.zeros(B, K, device=device)
        scores[:, 1:] = NEG  # all beams start identical: expand from the first only
        lengths = torch.zeros(B, K, dtype=torch.long, device=device)
        flags = torch.zeros(B, K, dtype=torch.bool, device=device)
        return cls(running, scores, running.clone(), torch.full((B, K), NEG, device=device), lengths, flags,
                   torch.ones(B, 1, dtype=torch.bool, device=device))


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    while idx.dim() < x.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(x, idx, dim=1)


@torch.inference_mode()
def beam_search(run: Runner, o: GenerationOptions, eos: Tensor, fill: int, early_stopping) -> Tensor:
    rows = run.logits.shape[0]
    K, T, lp = o.num_beams, o.max_new_tokens, o.length_penalty
    R = max(2, 1 + len(eos)) * K  # candidates kept per item
    top_k_mask = torch.arange(R, device=run.logits.device) < K
    run.repeat(K)
    b = _Beams.start(rows, K, T, fill, run.logits.device)
    slots = _Slots(rows, K, run.logits.device)
    for step in range(T):
        # log-probabilities in the cache's row order (a row's beam is `slots`' business), ranked after each row's
        # top R: the same numbers as in rank order, without moving the (rows, V) logits
        history = slots.physical(b.running[:, :, :step])
        if run.prompt_len:
            history = torch.cat((history.new_full((rows * K, 1), run.start), history), dim=1)
        logp = F.log_softmax(run.logits, dim=-1)
        logp = block_eos(penalise(logp, history, o.repetition_penalty), eos, step, o.min_new_tokens, in_place=True)
        top_scores, parent, token = _top_candidates(logp, b.running_scores, R, slots)
        candidates = _gather(b.running, parent)
        candidates[:, :, step] = token
        hits = torch.isin(token, eos) | (step + 1 >= T)  # EOS, or the length limit
        # running beams for the next step: the best K candidates that did not stop
        alive = top_scores + hits.float() * NEG
        keep = alive.topk(K, dim=1).indices
        b.running, b.running_scores = _gather(candidates, keep), _gather(alive, keep)
        beam_parent = _gather(parent, keep)
        _finish(b, candidates, top_scores, hits & top_k_mask, step, lp, early_stopping)
        run.reorder(slots.follow(beam_parent))
        b.open &= _can_improve(b, step + 1, T, lp, early_stopping)
        exists_open = not (bool(b.is_finished.all()) and early_stopping is True)
        if not (bool(b.open.any()) and exists_open and not bool(hits.all())):
            break
        run.step(slots.physical(b.running[:, :, step]))
    n = o.num_return_sequences
    length = int(b.finished_len[:, :n].max())
    return _with_prompt(run, b.finished[:, :n, :length].reshape(rows * n, length))


class _Slots:
    """Which row of the runner (its KV cache) holds each beam. Beams are ranked by score (beam j of an item is its
    j-th best), as transformers keeps them, but they need not sit in rank order in the cache: a beam continues in
    its parent's row, and only a parent's second and later children take a copy of its cache, into the rows of
    beams that left no child. Most beams continue one beam of the step before, so few rows are copied, where
    keeping the rows in rank order moves nearly all of them each step. Per-row results come back in rank order
    (`ranked`), the tokens go in row order (`physical`): the same numbers in the same order, the same tokens."""

    def __init__(self, items: int, K: int, device) -> None:
        self.K = K
        self.slot = torch.arange(K, device=device).repeat(items, 1)  # (items, K): row within the item of beam j
        self.identity = True

    def ranked(self, x: Tensor) -> Tensor:
        """(items, K, ...) with a cache row's values at its row -> with beam j's values at j."""
        if self.identity:
            return x
        return torch.take_along_dim(x, self._spread(x), dim=1)

    def physical(self, x: Tensor) -> Tensor:
        """(items, K, ...) in rank order -> (items * K, ...) in row order."""
        if not self.identity:
            x = torch.empty_like(x).scatter_(1, self._spread(x), x)
        return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])

    def _spread(self, x: Tensor) -> Tensor:
        slot = self.slot.view(*self.slot.shape, *[1] * (x.dim() - 2))
        return slot.expand(x.shape)

    def follow(self, parents: Tensor) -> Tensor:
        """New beams (items, K) whose parents are the given ranks: place each, and return for each cache row the
        row it continues (itself for most)."""
        parent_slot = torch.take_along_dim(self.slot, parents, dim=1).tolist()
        rows = list(range(len(parent_slot) * self.K))
        slots = []
        for item, parent_rows in enumerate(parent_slot):
            mine: list[int | None] = [None] * self.K
            taken: set[int] = set()
            for j, p in enumerate(parent_rows):  # a parent's first child (best ranked) stays in its row
                if p not in taken:
                    taken.add(p)
                    mine[j] = p
            free = iter(r for r in range(self.K) if r not in taken)
            for j, p in enumerate(parent_rows):  # its later children go to rows whose beam left no child
                if mine[j] is None:
                    mine[j] = next(free)
                    rows[item * self.K + mine[j]] = item * self.K + p
            slots.append(mine)
        self.slot = torch.tensor(slots, device=self.slot.device)
        self.identity = self.identity and slots == [list(range(self.K))] * len(slots)
        return torch.tensor(rows, device=self.slot.device)


def _top_candidates(logp: Tensor, running_scores: Tensor, R: int, slots: _Slots) -> tuple[Tensor, Tensor, Tensor]:
    """The R best (beam, token) continuations of each item by accumulated score: (B, R) scores, parent beams and
    tokens, best first, as one topk over the item's K x V scores gives them; `logp` rows in cache order (`slots`).
    Done in two stages, each beam's own top R and then the top R of those K x R, which holds the item's top R (one
    beam contributes at most R of them): the same candidates as topk over K x V (ties aside, whose order topk
    leaves open either way), in half the time at batch 8 x 5 beams, V = 50k (16 -> 8 ms a step on 2 cores): one
    long row per item runs on one thread, K rows of V in parallel, and the second stage is tiny."""
    B, K = running_scores.shape
    V = logp.shape[-1]
    if R > V:  # a vocabulary smaller than the candidates kept: one stage
        total = slots.ranked(logp.view(B, K, V)) + running_scores[:, :, None]
        top_scores, top_idx = total.view(B, K * V).topk(R, dim=1)
        return top_scores, top_idx // V, top_idx % V
    beam_scores, beam_tokens = logp.view(B, K, V).topk(R, dim=2)  # (B, K, R), per row: adding its score keeps order
    beam_scores, beam_tokens = slots.ranked(beam_scores), slots.ranked(beam_tokens)
    total = (beam_scores + running_scores[:, :, None]).view(B, K * R)
    top_scores, top_idx = total.topk(R, dim=1)
    return top_scores, top_idx // R, beam_tokens.view(B, K * R).gather(1, top_idx)


def _finish(b: _Beams, candidates: Tensor, scores: Tensor, just: Tensor, step: int, lp: float, early_stopping) -> None:
    """Merge hypotheses that just ended (among the top K candidates) into the finished set, best K kept."""
    scored = scores / ((step + 1) ** lp)
    full = b.is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
    scored = scored + full.float() * NEG + (~b.open).float() * NEG + (~just).float() * NEG
    merged_scores = torch.cat((b.finished_scores, scored), dim=1)
    best = merged_scores.topk(b.finished_scores.shape[1], dim=1).indices
    b.finished = _gather(torch.cat((b.finished, candidates), dim=1), best)
    b.finished_scores = _gather(merged_scores, best)
    b.finished_len = _gather(torch.cat((b.finished_len, torch.full_like(scores, step + 1, dtype=torch.long)), 1), best)
    b.is_finished = _gather(torch.cat((b.is_finished, just), dim=1), best)


def _can_improve(b: _Beams, length: int, max_len: int, lp: float, early_stopping) -> Tensor:
    """transformers' early-stop heuristic: could the best running beam still beat the worst finished one?"""
    best_len = max_len if early_stopping == "never" and lp > 0 else length
    best = b.running_scores[:, :1] / (best_len**lp)
    worst = torch.where(b.is_finished, b.finished_scores.min(dim=1, keepdim=True).values, NEG)
    return (best > worst).any(dim=-1, keepdim=True)


def decode(lm, embeds: Tensor, mask: Tensor, o: GenerationOptions, eos_ids: list[int], pad_id: int | None,
           head: ScreenedHead | None = None) -> Tensor:
    """Token ids (rows * num_return_sequences, L), laid out as transformers' generate returns them. `head`: an
    int8 screen of the fp32 LM head for greedy's argmax (the same tokens; screened_head.py)."""
    eos = torch.tensor(eos_ids, device=embeds.device)
    with torch.inference_mode():
        run = runner(lm, embeds, mask, o.max_new_tokens, head if o.num_beams == 1 else None)
        if o.num_beams == 1:  # generate pads finished rows with the pad id
            return greedy(run, o, eos, eos_ids[0] if pad_id is None else pad_id)
        # beam search fills with `pad or eos` (so a pad id of 0, as T5's, falls back to EOS)
        return beam_search(run, o, eos, pad_id if pad_id else eos_ids[0], stopping_rule(lm))
