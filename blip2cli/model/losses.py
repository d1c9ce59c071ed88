"""BLIP-2 losses as pure functions of tensors: stage-1 ITC, ITM with hard negatives, ITG (LAVIS Blip2Qformer); LM.

Shape letters: B local batch, W world size, Q queries, D embed dim, T text length, V vocab, N image tokens.

Every torch.distributed call goes through `rank_and_world()`: without an initialised process group the world is
one rank and every gather is the identity, so single-GPU and CPU runs never touch `dist` (LAVIS #537). Gathers
need the same shape on every rank (all_gather cannot pad): a distributed loader must drop the last partial batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label value that is not a target (torch's cross_entropy default)
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# --- distributed helpers ----------------------------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is unavailable or has no process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank on dim 0, detached: (B, ...) -> (B*W, ...).

    Detached at world size 1 as well, so one process has the same gradient paths as many.
    """
    _, world = rank_and_world()
    if world == 1:
        return x.detach()
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of all ranks and keeps the local slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = rank_and_world()
        ctx.rank, ctx.batch = rank, x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every rank's loss may use every slice, so the local slice's gradient is the sum over ranks.
        # all_reduce works in place: reduce a contiguous copy, never autograd's own buffer.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank on dim 0, keeping the gradient: (B, ...) -> (B*W, ...) (LAVIS Blip2Qformer)."""
    _, world = rank_and_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


# --- ITC (LAVIS Blip2Qformer) -----------------------------------------------------------------------------------------


@dataclass
class ItcOutput:
    loss: Tensor  # scalar
    sim_i2t: Tensor  # (B, B*W): local images vs the global batch of texts, divided by temp
    sim_t2i: Tensor  # (B, B*W): local texts vs the global batch of images, divided by temp
    # Both sims are float32 and keep their graph; `sample_hard_negatives` reads them without gradient.


def itc_similarity(img: Tensor, txt: Tensor) -> Tensor:
    """s(i, t) = max over queries of <img[i, q], txt[t]>: (Bi, Q, D), (Bt, D) -> (Bi, Bt).

    With L2-normalised inputs this is the best query's cosine, the score used in the loss and in retrieval.
    """
    return torch.einsum("iqd,td->itq", img, txt).max(dim=-1).values


def positive_mask(batch_size: int, image_ids: Tensor | None, device: torch.device | str | None = None) -> Tensor:
    """(B, B*W) bool: which global samples are positives of each local sample.

    Default: only the sample itself, at column rank*B + b. Multi-positive mode (`image_ids` given): every
    sample of the global batch with the same image id. Gathers `image_ids`, so every rank must call it.
    """
    rank, world = rank_and_world()
    if image_ids is None:
        mask = torch.zeros(batch_size, batch_size * world, dtype=torch.bool, device=device)
        own = torch.arange(batch_size, device=device)
        mask[own, rank * batch_size + own] = True
        return mask
    _check_image_ids(image_ids, batch_size)
    ids_all = gather_no_grad(image_ids)  # (B*W,)
    return image_ids[:, None] == ids_all[None, :]


def _check_image_ids(image_ids: Tensor, batch_size: int) -> None:
    # LAVIS switched modes on the mere presence of an `image_id` key, and crashed or went silently wrong on
    # strings and per-dataset indices (LAVIS Blip2Qformer): we take explicit, globally unique integer ids only.
    if image_ids.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"image_ids must be an integer tensor of global image ids, got dtype {image_ids.dtype}")
    if tuple(image_ids.shape) != (batch_size,):
        raise ValueError(f"image_ids must have shape ({batch_size},), got {tuple(image_ids.shape)}")


def _soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over rows of -sum_j target[b, j] * log_softmax(logits)[b, j]."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def itc_loss(
    img_local: Tensor,
    txt_local: Tensor,
    temp: Tensor,
    image_ids: Tensor | None = None,
    label_smoothing: float = 0.1,
) -> ItcOutput:
    """Image-text contrastive loss over the global batch.

    img_local (B, Q, D) and txt_local (B, D) are L2-normalised; temp is the learnable scalar, used as given
    (never clamped, LAVIS Blip2Qformer). The other side of each similarity is gathered without gradient, as in LAVIS:
    images get their gradient from the i2t rows, texts from the t2i rows.

    Default: y_b = rank*B + b and loss = (CE_eps(sim_i2t, y) + CE_eps(sim_t2i, y)) / 2, torch's label
    smoothing, i.e. target (1-eps)*onehot + eps/(B*W). Multi-positive mode (`image_ids`, integer, globally
    unique per image): target = (1-eps)*P/sum(P) + eps/(B*W) with P[b, j] = [id_b == id_j], the same
    formula with several positives; with unique ids both modes give the same loss.
    """
    rank, _ = rank_and_world()
    B = img_local.shape[0]
    # 1. The global batch, without gradient.
    img_all = gather_no_grad(img_local)  # (B*W, Q, D)
    txt_all = gather_no_grad(txt_local)  # (B*W, D)
    # 2. Similarities, temperature included.
    sim_i2t = itc_similarity(img_local, txt_all).float() / temp  # (B, B*W)
    sim_t2i = itc_similarity(img_all, txt_local).t().float() / temp  # (B, B*W)
    # 3. Cross-entropy in both directions.
    if image_ids is None:
        y = rank * B + torch.arange(B, device=sim_i2t.device)  # (B,)
        loss_i2t = F.cross_entropy(sim_i2t, y, label_smoothing=label_smoothing)
        loss_t2i = F.cross_entropy(sim_t2i, y, label_smoothing=label_smoothing)
    else:
        P = positive_mask(B, image_ids.to(sim_i2t.device), sim_i2t.device).float()  # (B, B*W)
        target = (1 - label_smoothing) * P / P.sum(dim=1, keepdim=True) + label_smoothing / P.shape[1]
        loss_i2t = _soft_cross_entropy(sim_i2t, target)
        loss_t2i = _soft_cross_entropy(sim_t2i, target)
    return ItcOutput(loss=(loss_i2t + loss_t2i) / 2, sim_i2t=sim_i2t, sim_t2i=sim_t2i)


# --- ITM with hard negatives (LAVIS Blip2Qformer) ---------------------------------------------------------------------


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: Tensor,
    sim_t2i: Tensor,
    image_ids: Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw one hard negative per local sample from the global batch, weighted by softmax(sim).

    Returns (negative image index for each local text, negative text index for each local image), both (B,)
    indices into the gathered batch. Works on copies of the (B, B*W) ITC sims (temperature included).

    Positives (the sample itself, or every same-id sample when `image_ids` is given) get weight exactly 0.
    LAVIS fills them with -10000 before the softmax; we fill -inf, which gives the same weights whenever
    -10000 would underflow and stays right when |sim| approaches 10000 (temp <= 1e-4), where -10000 would
    make the positive the likeliest draw.

    Raises ValueError when some sample has no negative at all (a global batch of one sample, or every
    sample sharing one image id in multi-positive mode: ITM needs >= 2 distinct images per global batch),
    or when the sims are not finite (diverged training); drawing there would crash in torch.multinomial
    or silently return a positive.
    """
    B, BW = sim_i2t.shape
    _, world = rank_and_world()
    if sim_t2i.shape != (B, BW) or BW != B * world:
        shapes = f"{tuple(sim_i2t.shape)} and {tuple(sim_t2i.shape)}"
        raise ValueError(f"expected ITC sims of shape ({B}, {B * world}), got {shapes}")
    positives = positive_mask(B, image_ids, sim_i2t.device)  # (B, B*W)
    neg_image = _draw_excluding(sim_t2i, positives, generator)  # (B,)
    neg_text = _draw_excluding(sim_i2t, positives, generator)  # (B,)
    return neg_image, neg_text


def _draw_excluding(sim: Tensor, excluded: Tensor, generator: torch.Generator | None) -> Tensor:
    if bool(excluded.all(dim=1).any()):
        raise ValueError(
            f"ITM hard negatives: a sample has no negative in the global batch of {sim.shape[1]} "
            "(ITM needs at least 2 samples, and 2 distinct image ids in multi-positive mode)"
        )
    if not bool(torch.isfinite(sim).all()):
        raise ValueError("ITM hard negatives: the ITC similarities are not finite (diverged loss or zero temp?)")
    weights = sim.float().masked_fill(excluded, float("-inf")).softmax(dim=1)  # a copy; positives get 0
    return torch.multinomial(weights, 1, generator=generator)[:, 0]


@dataclass
class ItmPairs:
    text_ids: Tensor  # (3B, T): [T_pos; T_pos; T_neg]
    text_mask: Tensor  # (3B, T)
    pos_image_embeds: Tensor  # (B, N, Dv): the local images
    neg_image_embeds: Tensor  # (B, N, Dv): each text's hard-negative image, gathered with gradient

    @property
    def image_embeds(self) -> Tensor:
        """(3B, N, Dv): [E_pos; E_neg; E_pos]. The model avoids building it: it projects the B positive and B
        negative images once and indexes their cross-attention keys/values instead."""
        return torch.cat([self.pos_image_embeds, self.neg_image_embeds, self.pos_image_embeds])


def itm_pairs(
    text_ids: Tensor, text_mask: Tensor, image_embeds: Tensor, neg_image_idx: Tensor, neg_text_idx: Tensor
) -> ItmPairs:
    """Build the 3B ITM pairs from local tensors: B positives, then B (text, hard-negative image), then B
    (hard-negative text, image). Gathers the texts without gradient and the image embeddings with gradient
    (LAVIS Blip2Qformer), so every rank must call it; the indices come from `sample_hard_negatives`.
    """
    ids_all, mask_all = gather_no_grad(text_ids), gather_no_grad(text_mask)  # (B*W, T)
    embeds_all = gather_with_grad(image_embeds)  # (B*W, N, Dv)
    return ItmPairs(
        text_ids=torch.cat([text_ids, text_ids, ids_all[neg_text_idx]]),
        text_mask=torch.cat([text_mask, text_mask, mask_all[neg_text_idx]]),
        pos_image_embeds=image_embeds,
        neg_image_embeds=embeds_all[neg_image_idx],
    )


def itm_loss(logits: Tensor, batch_size: int) -> Tensor:
    """CE of the (3B, 2) ITM logits against labels [1]*B + [0]*2B (match, then the two negatives); no smoothing."""
    if logits.shape != (3 * batch_size, 2):
        raise ValueError(f"expected ITM logits of shape ({3 * batch_size}, 2), got {tuple(logits.shape)}")
    labels = torch.zeros(3 * batch_size, dtype=torch.long, device=logits.device)
    labels[:batch_size] = 1
    return F.cross_entropy(logits.float(), labels)


# --- training-health metrics (a stuck stage-1 run should be visible in minutes) --------------------------
# Measurements on the tensors the losses already built, without gradient; they never change a loss.


def itm_prior_loss() -> float:
    """ITM's loss when it predicts only the label prior (1 match in 3 pairs): the entropy H(1/3) = 0.6365."""
    return -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)


def itc_chance_loss(global_batch: int) -> float:
    """ITC's loss when every similarity is equal: ln(B*W), whatever the label smoothing or the positives."""
    return math.log(global_batch)


@torch.no_grad()
def itc_accuracy(sim_i2t: Tensor, sim_t2i: Tensor, image_ids: Tensor | None = None) -> Tensor:
    """In-batch top-1 accuracy of ITC over the global batch, image->text and text->image averaged: the share of
    rows whose highest similarity is a positive. Chance: 1/(B*W) (more in multi-positive mode). Gathers the ids
    in multi-positive mode, so every rank must call it."""
    positives = positive_mask(sim_i2t.shape[0], image_ids, sim_i2t.device)  # (B, B*W)
    i2t = positives.gather(1, sim_i2t.argmax(dim=1, keepdim=True)).float().mean()
    t2i = positives.gather(1, sim_t2i.argmax(dim=1, keepdim=True)).float().mean()
    return (i2t + t2i) / 2


@torch.no_grad()
def itm_accuracy(logits: Tensor, batch_size: int) -> Tensor:
    """Balanced ITM accuracy of the (3B, 2) logits: the mean of the hit rate on the B positives and on the 2B hard
    negatives. 0.5 is chance, and always answering "no match" (the prior, 2/3 plain accuracy) scores 0.5 too."""
    predicted = logits.argmax(dim=1)  # (3B,)
    positives = predicted[:batch_size].eq(1).float().mean()
    negatives = predicted[batch_size:].eq(0).float().mean()
    return (positives + negatives) / 2


# --- language-model losses and labels (LAVIS Blip2Qformer, LAVIS Blip2OPT, LAVIS Blip2T5) -----------------------------


def lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Next-token CE: logits[:, t] predicts labels[:, t+1]; mean over targets that are not IGNORE_INDEX.

    (B, T, V), (B, T) -> scalar, computed in float32. Smoothing 0.1 for ITG, 0 for the stage-2 LLM. A batch
    without a single target gives 0 (with a graph), not NaN.
    """
    V = logits.shape[-1]
    pred = logits[:, :-1].reshape(-1, V).float()  # (B*(T-1), V)
    target = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    total = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)


def itg_labels(input_ids: Tensor, pad_id: int) -> Tensor:
    """ITG targets: the decoder ids with pads set to IGNORE_INDEX. The [DEC] at position 0 is never a target
    because `lm_loss` drops it in the shift."""
    return input_ids.masked_fill(input_ids == pad_id, IGNORE_INDEX)


def stage2_decoder_labels(
    input_ids: Tensor, attention_mask: Tensor, prompt_lengths: Tensor | int, num_prefix: int
) -> Tensor:
    """Targets for a decoder-only LLM fed [num_prefix visual tokens ; text] (OPT, LAVIS Blip2OPT): (B, T) -> (B, P+T).

    IGNORE_INDEX on the visual prefix, on padding, and on the first prompt_lengths[b] real tokens of each
    text, BOS included (counted from the first non-pad token, so left padding works too). With prompt length
    0 (pretraining) BOS is itself a target, predicted from the last query, as in LAVIS.
    """
    B = input_ids.shape[0]
    real = attention_mask.bool()  # (B, T)
    position = real.long().cumsum(dim=1) - 1  # (B, T): index among the real tokens
    prompt = torch.as_tensor(prompt_lengths, device=input_ids.device).reshape(-1, 1)  # (B, 1) or (1, 1)
    text = input_ids.masked_fill(~real | (position < prompt), IGNORE_INDEX)  # (B, T)
    prefix = torch.full((B, num_prefix), IGNORE_INDEX, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([prefix, text], dim=1)


def seq2seq_labels(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Decoder targets for FlanT5 (LAVIS Blip2T5): the `text_output` ids with pads set to IGNORE_INDEX. T5 shifts
    them itself, so its loss is not `lm_loss`."""
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
