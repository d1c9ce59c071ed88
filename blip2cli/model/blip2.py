"""BLIP-2: frozen image encoder -> ln_vision -> Q-Former (32 queries) -> heads, and optionally a frozen LLM.

The inference API the commands call:
  vision_embeds(pixels)        E = ln_vision(ViT(x))                         (B, N, Dv)
  image_features(E)            normalised ITC query vectors                   (B, Q, 256)
  text_features(texts)         normalised ITC text vectors ([CLS])           (T, 256)
  itm_logits(E, texts)         2-class ITM logits, mean over queries, pairs   (B, 2)
  generate(pixels, prompts, o) captions / answers (LLM, or the Q-Former alone for stage-1 models)
and the training objectives: stage1_loss (ITC + ITM + ITG, LAVIS Blip2Qformer), stage2_loss (LM, LAVIS Blip2OPT/T5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2cli.config import GenerationOptions, ModelConfig
from blip2cli.model import losses
from blip2cli.model.llm import FrozenLLM
from blip2cli.model.qformer import QFormer, QueryCache
from blip2cli.model.qformer_generate import qformer_generate
from blip2cli.model.vision import VisionEncoder


@dataclass
class Stage1Output:
    loss: Tensor
    itc: Tensor
    itm: Tensor
    itg: Tensor
    itc_acc: Tensor | None = None  # in-batch top-1 accuracy, both directions (losses.itc_accuracy); 1/B = chance
    itm_acc: Tensor | None = None  # balanced accuracy on positives vs hard negatives (losses.itm_accuracy); 0.5


@dataclass
class Stage2Output:
    loss: Tensor


class Blip2(nn.Module):
    def __init__(self, cfg: ModelConfig, llm: FrozenLLM | None = None, tokenizer=None) -> None:
        """`llm` is the frozen language model (stage 2 and captioning); `tokenizer` the Q-Former's BERT tokenizer
        with [DEC] (stage 1, retrieval, ITG)."""
        super().__init__()
        self.cfg = cfg
        q = cfg.qformer
        self.vision = VisionEncoder(cfg.vision)
        self.ln_vision = nn.LayerNorm(self.vision.width, eps=cfg.vision.ln_vision_eps)  # trainable in all stages
        self.query_tokens = nn.Parameter(torch.randn(1, q.num_queries, q.hidden_size) * 0.02)
        self.qformer = QFormer(q, self.vision.width)
        if q.text:
            self.vision_proj = nn.Linear(q.hidden_size, q.embed_dim)
            self.text_proj = nn.Linear(q.hidden_size, q.embed_dim)
            self.itm_head = nn.Linear(q.hidden_size, 2)
            self.temp = nn.Parameter(torch.tensor(0.07))  # learnable, never clamped (LAVIS Blip2Qformer)
        self.llm = llm
        self.llm_proj = nn.Linear(q.hidden_size, llm.hidden_size) if llm is not None else None
        self.tokenizer = tokenizer
        self.name = ""  # what --model said
        self.fingerprint = ""  # identifies the weights (retrieval indexes record it)
        self.quantize = "none"  # none|int8|int4: how the frozen towers' linear layers are stored (model/quantize.py)
        self.fresh_itg_head = False  # loaded from HF format, which cannot hold temp and the ITG head

    # ------------------------------------------------------------------ inference API

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def vision_embeds(self, pixels: Tensor) -> Tensor:
        """E = ln_vision(ViT(pixels)), LayerNorm in fp32 (LAVIS eva_vit). (B, 3, S, S) -> (B, N, Dv) fp32."""
        feats = self.vision(pixels.to(self.device))  # (B, N, Dv), the tower's dtype
        return F.layer_norm(
            feats.float(), feats.shape[-1:], self.ln_vision.weight.float(), self.ln_vision.bias.float(),
            self.ln_vision.eps,
        )

    def query_image(self, embeds: Tensor, image_kv: list | None = None) -> tuple[Tensor, QueryCache]:
        """The query pass: Z (B, Q, H) and its per-layer K/V (for ITG). The Q-Former computes in fp32.
        `image_kv`: the images' cross-attention keys/values, when already projected (`qformer.image_kv`)."""
        queries = self.query_tokens.expand(embeds.shape[0], -1, -1)
        image = embeds.to(queries.dtype) if image_kv is None else None
        return self.qformer.encode_queries(queries, image, image_kv)

    def image_features(self, embeds: Tensor) -> Tensor:
        """Normalised ITC query vectors (B, Q, 256)."""
        z, _ = self.query_image(embeds)
        return F.normalize(self._need("vision_proj")(z), dim=-1)

    def tokenize(
        self, texts: Sequence[str], pad_to_max: bool = False, max_len: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Q-Former tokens (B, T) and mask, cut at `max_len` tokens (default: the config's `max_text_len`, 32 as in
        training; LAVIS evaluates retrieval at 35). Texts are cleaned by the caller (data.transforms.clean_caption)."""
        if self.tokenizer is None:
            raise ValueError("this model has no Q-Former tokenizer: text features need a stage-1/retrieval model")
        enc = self.tokenizer(
            list(texts), padding="max_length" if pad_to_max else "longest", truncation=True,
            max_length=max_len or self.cfg.qformer.max_text_len, return_tensors="pt",
        )
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def _text_vectors(self, ids: Tensor, mask: Tensor) -> Tensor:
        hidden = self.qformer.encode_text(ids, mask)  # (B, T, H)
        return F.normalize(self._need("text_proj")(hidden[:, 0]), dim=-1)

    def text_features(self, texts: Sequence[str], max_len: int | None = None) -> Tensor:
        """Normalised ITC text vectors (T, 256) from the [CLS] position."""
        return self._text_vectors(*self.tokenize(texts, max_len=max_len))

    def _itm(self, embeds: Tensor | None, ids: Tensor, mask: Tensor, image_kv: list | None = None) -> Tensor:
        """ITM logits (B, 2) of aligned pairs; the images as embeddings, or as projected keys/values."""
        queries = self.query_tokens.expand(ids.shape[0], -1, -1)
        image = embeds.to(queries.dtype) if image_kv is None else None
        hidden = self.qformer.encode_joint(queries, ids, mask, image, image_kv)
        return self._need("itm_head")(hidden[:, : queries.shape[1]]).mean(dim=1)  # (B, 2)

    def itm_logits(self, embeds: Tensor, texts: Sequence[str], max_len: int | None = None) -> Tensor:
        """ITM logits for aligned (image, text) pairs, averaged over queries (LAVIS Blip2Qformer). [:, 1] ranks."""
        return self._itm(embeds, *self.tokenize(texts, max_len=max_len))

    def llm_prefix(self, embeds: Tensor) -> Tensor:
        """The soft visual prompt: proj(Z) (B, Q, d_llm)."""
        if self.llm is None or self.llm_proj is None:
            raise ValueError("this model has no language model")
        z, _ = self.query_image(embeds)
        return self.llm_proj(z)

    @torch.no_grad()
    def generate(self, pixels: Tensor, prompts: Sequence[str], options: GenerationOptions) -> list[list[str]]:
        """Texts per image (options.num_return_sequences each). Without an LLM, the Q-Former captions."""
        embeds = self.vision_embeds(pixels)
        if self.llm is None:
            return qformer_generate(self, embeds, options)
        return self.llm.generate(self.llm_prefix(embeds), prompts, options)

    # ------------------------------------------------------------------ training objectives

    def stage1_loss(self, pixels: Tensor, texts: Sequence[str], image_ids: Tensor | None = None) -> Stage1Output:
        """ITC + ITM + ITG, unweighted (LAVIS Blip2Qformer). `image_ids` switches ITC/ITM to multi-positive mode."""
        embeds = self.vision_embeds(pixels)  # (B, N, Dv)
        image_kv = self.qformer.image_kv(embeds)  # projected once: the query pass and the ITM positives share it
        z, cache = self.query_image(embeds, image_kv)  # (B, Q, H)
        img = F.normalize(self.vision_proj(z), dim=-1)  # (B, Q, 256)
        ids, mask = self.tokenize(texts, pad_to_max=True)  # fixed length so ranks can gather
        txt = self._text_vectors(ids, mask)  # (B, 256)

        itc = losses.itc_loss(img, txt, self.temp, image_ids)
        itm, itm_acc = self._itm_loss(embeds, image_kv, ids, mask, itc, image_ids)

        dec = ids.clone()
        dec[:, 0] = self.tokenizer.bos_token_id  # [DEC] replaces [CLS]
        hidden, _ = self.qformer.decode_text(dec, mask, cache)
        labels = losses.itg_labels(dec, self.tokenizer.pad_token_id)
        itg = losses.lm_loss(self.qformer.lm_logits(hidden), labels, label_smoothing=0.1)
        itc_acc = losses.itc_accuracy(itc.sim_i2t, itc.sim_t2i, image_ids)
        return Stage1Output(itc.loss + itm + itg, itc.loss.detach(), itm.detach(), itg.detach(), itc_acc, itm_acc)

    def _itm_loss(
        self, embeds: Tensor, image_kv: list, ids: Tensor, mask: Tensor, itc: losses.ItcOutput,
        image_ids: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """ITM with hard negatives from the global batch (LAVIS Blip2Qformer): texts [T+;T+;T-] against images [E+;E-;E+],
        E with gradient. The images' cross-attention K/V are projected once per image, not once per pair.
        Returns the loss and the balanced accuracy of its logits."""
        neg_img, neg_txt = losses.sample_hard_negatives(itc.sim_i2t, itc.sim_t2i, image_ids)
        pairs = losses.itm_pairs(ids, mask, embeds, neg_img, neg_txt)
        neg_kv = self.qformer.image_kv(pairs.neg_image_embeds)
        pair_kv = [None if pos is None else tuple(torch.cat((p, n, p)) for p, n in zip(pos, neg))
                   for pos, neg in zip(image_kv, neg_kv)]
        logits = self._itm(None, pairs.text_ids, pairs.text_mask, pair_kv)  # (3B, 2)
        return losses.itm_loss(logits, embeds.shape[0]), losses.itm_accuracy(logits, embeds.shape[0])

    def stage2_loss(self, pixels: Tensor, texts: Sequence[str], prompt: str | Sequence[str] = "",
                    outputs: Sequence[str] | None = None) -> Stage2Output:
        """LM loss through the frozen LLM (LAVIS Blip2OPT/T5). Decoder-only: `texts` are prompt + caption, the prompt
        (BOS included) is masked; `prompt` is one for the batch or one per sample (VQA: each question).
        Flan-T5: `texts` go to the encoder and `outputs` are the targets."""
        prefix = self.llm_prefix(self.vision_embeds(pixels))  # (B, Q, d_llm)
        if self.llm.is_encoder_decoder:
            if outputs is None:
                raise ValueError("Flan-T5 training needs target texts (`outputs`)")
            return Stage2Output(self.llm.seq2seq_loss(prefix, texts, outputs))
        embeds, mask, ids, prompt_len = self.llm.decoder_loss_inputs(prefix, texts, prompt)
        logits = self.llm.model(inputs_embeds=embeds, attention_mask=mask).logits
        text_mask = mask[:, prefix.shape[1]:]
        labels = losses.stage2_decoder_labels(ids, text_mask, prompt_len, prefix.shape[1])
        return Stage2Output(losses.lm_loss(logits.float(), labels))

    # ------------------------------------------------------------------ helpers

    def _need(self, name: str) -> nn.Module:
        module = getattr(self, name, None)
        if module is None:
            raise ValueError(f"this model has no {name} (a stage-2 checkpoint has no ITC/ITM heads)")
        return module

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Only parameters that require grad (paper §4, LAVIS yaml checkpoints), tied copies dropped."""
        return {k: v for k, v in self.named_parameters() if v.requires_grad and not _is_tied(k)}


def _is_tied(name: str) -> bool:
    return name.endswith("cls.predictions.decoder.weight")
