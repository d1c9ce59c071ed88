"""The Q-Former (BLIP-2 §3.1): a BERT-base encoder whose 32 learned queries cross-attend to the image.

Queries and text share each layer's self-attention; queries then cross-attend to the image (every second
layer) and pass through their own FFN (`*_query`), text through BERT's FFN. Parameter names follow LAVIS's
`Qformer.bert.*` / `Qformer.cls.*` without the prefix, so LAVIS files map one to one.

The three attention regimes of stage 1 (LAVIS Qformer) are three methods:
  encode_queries  queries only, cross-attention on            -> Z (ITC image side, stage 2, ITG's K/V cache)
  encode_text     text only, padding mask                     -> T (ITC text side)
  encode_joint    queries + text, bidirectional, cross-attn   -> ITM
  decode_text     text only over the queries' cached K/V, causal -> ITG and Q-Former captioning
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2cli.config import QFormerConfig

KV = tuple[Tensor, Tensor]  # (B, H, S, Dh) keys and values of one layer's attention
ImageKV = list  # per layer: the image tokens' cross-attention KV, or None for layers without cross-attention


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.dropout = cfg.attention_dropout
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def _split(self, x: Tensor) -> Tensor:
        B, S, D = x.shape
        return x.view(B, S, self.heads, D // self.heads).transpose(1, 2)  # (B, H, S, Dh)

    def project(self, source: Tensor) -> KV:
        """Keys and values of `source` (B, S, D) -> 2 x (B, H, S, Dh)."""
        return self._split(self.key(source)), self._split(self.value(source))

    def forward(
        self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None, past: KV | None = None,
        kv: KV | None = None,
    ) -> tuple[Tensor, KV]:
        """`kv`: the context's keys and values already projected (cross-attention over an image used twice)."""
        q = self._split(self.query(x))
        k, v = kv if kv is not None else self.project(x if context is None else context)
        if past is not None:  # ITG: text attends to the queries' keys/values from the image pass
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, S, Dh)
        B, H, S, Dh = out.shape
        return out.transpose(1, 2).reshape(B, S, H * Dh), (k, v)


class AddNorm(nn.Module):
    """BERT's output block: LayerNorm(dropout(dense(x)) + residual)."""

    def __init__(self, cfg: QFormerConfig, in_width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_width: int) -> None:
        super().__init__()
        self.self = MultiHeadAttention(cfg, kv_width)
        self.output = AddNorm(cfg, cfg.hidden_size)

    def forward(
        self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None, past: KV | None = None,
        kv: KV | None = None,
    ) -> tuple[Tensor, KV]:
        out, kv = self.self(x, context, mask, past, kv)
        return self.output(out, x), kv


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # BERT's exact GELU


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int, vision_width: int) -> None:
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        # BLIP-2 §3.1: cross-attention every other layer (0, 2, ..., 10), queries only.
        self.has_cross = index % cfg.cross_attention_every == 0
        self.crossattention = Attention(cfg, vision_width) if self.has_cross else None
        self.intermediate_query = Intermediate(cfg)
        self.output_query = AddNorm(cfg, cfg.intermediate_size)
        if cfg.text:
            self.intermediate = Intermediate(cfg)
            self.output = AddNorm(cfg, cfg.intermediate_size)

    def forward(
        self, h: Tensor, mask: Tensor | None, image: Tensor | None, num_queries: int, past: KV | None,
        image_kv: KV | None = None,
    ) -> tuple[Tensor, KV]:
        h, kv = self.attention(h, mask=mask, past=past)  # shared self-attention over [queries ; text]
        parts = []
        if num_queries > 0:
            q = h[:, :num_queries]
            if self.crossattention is not None:  # all-ones mask over the image tokens
                q, _ = self.crossattention(q, context=image, kv=image_kv)
            parts.append(self.output_query(self.intermediate_query(q), q))
        if h.shape[1] > num_queries:
            t = h[:, num_queries:]
            parts.append(self.output(self.intermediate(t), t))
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), kv


class Embeddings(nn.Module):
    """word + absolute position embeddings for text; LayerNorm and dropout over [queries ; text] (LAVIS Qformer)."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        if cfg.text:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor | None = None, queries: Tensor | None = None, offset: int = 0) -> Tensor:
        parts = [] if queries is None else [queries]
        if ids is not None:
            pos = torch.arange(offset, offset + ids.shape[1], device=ids.device)  # queries get no positions
            parts.append(self.word_embeddings(ids) + self.position_embeddings(pos))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.LayerNorm(x))


class Encoder(nn.Module):
    def __init__(self, cfg: QFormerConfig, vision_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i, vision_width) for i in range(cfg.num_layers))


class PredictionTransform(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class Predictions(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # tied to word_embeddings
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x)) + self.bias


class LMHead(nn.Module):
    """BERT's MLM head used for ITG (`Qformer.cls`)."""

    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.predictions = Predictions(cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictions(x)


@dataclass
class QueryCache:
    """Per-layer self-attention keys/values of the query pass, reused by ITG and Q-Former generation."""

    layers: list[KV]

    def expand(self, repeats: int) -> QueryCache:
        return QueryCache([(k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0)) for k, v in self.layers])

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2]


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig, vision_width: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg, vision_width)
        self.cls = LMHead(cfg) if cfg.text else None
        self.apply(self._init)
        self.tie_weights()

    @staticmethod
    def _init(module: nn.Module) -> None:  # BERT's init
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def tie_weights(self) -> None:
        """The LM head's decoder shares the word embeddings (LAVIS Qformer). Re-run after loading with assign=True."""
        if self.cls is not None:
            self.cls.predictions.decoder.weight = self.embeddings.word_embeddings.weight

    def _run(
        self, h: Tensor, mask: Tensor | None, image: Tensor | None, num_queries: int, past: QueryCache | None = None,
        image_kv: ImageKV | None = None,
    ) -> tuple[Tensor, list[KV]]:
        presents = []
        for i, layer in enumerate(self.encoder.layer):
            cross = None if image_kv is None else image_kv[i]
            h, kv = layer(h, mask, image, num_queries, None if past is None else past.layers[i], cross)
            presents.append(kv)
        return h, presents

    def image_kv(self, image: Tensor) -> ImageKV:
        """Cross-attention keys and values of the image tokens, per layer (None where a layer has none). Stage 1
        uses each image in the query pass and again in ITM pairs: projecting it once serves both."""
        return [layer.crossattention.self.project(image) if layer.crossattention is not None else None
                for layer in self.encoder.layer]

    def encode_queries(
        self, queries: Tensor, image: Tensor | None, image_kv: ImageKV | None = None
    ) -> tuple[Tensor, QueryCache]:
        """queries (B, Q, H), image (B, N, Dv) or its projections -> Z (B, Q, H) and the K/V cache for ITG."""
        h = self.embeddings(queries=queries)
        h, presents = self._run(h, None, image, queries.shape[1], image_kv=image_kv)
        return h, QueryCache(presents)

    def encode_text(self, ids: Tensor, pad_mask: Tensor) -> Tensor:
        """Unimodal text pass for ITC: ids (B, T), pad_mask (B, T) -> (B, T, H)."""
        h = self.embeddings(ids)
        h, _ = self._run(h, _key_mask(pad_mask), None, 0)
        return h

    def encode_joint(
        self, queries: Tensor, ids: Tensor, pad_mask: Tensor, image: Tensor | None, image_kv: ImageKV | None = None
    ) -> Tensor:
        """Bidirectional [queries ; text] pass for ITM -> (B, Q+T, H)."""
        B, Q, _ = queries.shape
        h = self.embeddings(ids, queries=queries)
        keys = torch.cat((pad_mask.new_ones(B, Q), pad_mask), dim=1)
        h, _ = self._run(h, _key_mask(keys), image, Q, image_kv=image_kv)
        return h

    def decode_text(
        self, ids: Tensor, pad_mask: Tensor, cache: QueryCache, offset: int = 0
    ) -> tuple[Tensor, QueryCache]:
        """Causal text over the cached queries (ITG, LAVIS Qformer): text row i sees every query, itself and earlier
        non-pad text. `offset` is the number of text tokens already in the cache (incremental decoding)."""
        h = self.embeddings(ids, offset=offset)
        mask = _itg_mask(pad_mask, cache.length, ids.shape[1])
        h, presents = self._run(h, mask, None, 0, past=cache)
        return h, QueryCache(presents)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        if self.cls is None:
            raise ValueError("this Q-Former has no text head (a stage-2 checkpoint): ITG is not available")
        return self.cls(hidden)


def _key_mask(keys: Tensor) -> Tensor:
    """(B, S) 1/0 key mask -> boolean SDPA mask (B, 1, 1, S); True = may attend."""
    return keys.bool()[:, None, None, :]


def _itg_mask(pad_mask: Tensor, cached: int, T: int) -> Tensor:
    """(B, 1, T, cached+T) mask for ITG: the cached columns (queries, and text already decoded) are visible
    to every row; new text is causal and padding-masked. pad_mask covers the T new tokens."""
    B = pad_mask.shape[0]
    causal = torch.ones(T, T, dtype=torch.bool, device=pad_mask.device).tril()
    text = causal[None] & pad_mask.bool()[:, None, :]  # (B, T, T)
    past = torch.ones(B, T, cached, dtype=torch.bool, device=pad_mask.device)
    return torch.cat((past, text), dim=2)[:, None]
