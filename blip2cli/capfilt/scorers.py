"""The models that rank CapFilt texts: a BLIP-2 retrieval model (ITC, optionally ITM) or a CLIP model.

Both give L2-normalised image vectors (B, Q, D) and text vectors (T, D); a text's score is the best query's
cosine (BLIP-2: max over its 32 queries; CLIP: its one image vector, Q = 1). BLIP-2 CapFilt ranked with CLIP
ViT-L/14 (`--scorer openai/clip-vit-large-patch14`, loaded with transformers' CLIPModel); BLIP v1's filter
needs an ITM head, so `--filter itm` takes a BLIP-2 scorer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from blip2cli.data.transforms import clean_caption, eval_pixel
from blip2cli.errors import UsageError
from blip2cli.model.blip2 import Blip2
from blip2cli.model.capabilities import require


@dataclass
class ImageBatch:
    """What a scorer keeps of a batch of images: its vectors, and for BLIP-2 the embeddings ITM needs."""

    vectors: Tensor  # (B, Q, D), normalised
    embeds: Tensor | None = None  # (B, N, Dv)


def best_query_cosine(image_vectors: Tensor, text_vectors: Tensor) -> Tensor:
    """(Q, D) x (T, D) -> (T,): each text's cosine with its best image query."""
    return (text_vectors.float() @ image_vectors.float().T).amax(dim=1)


class Blip2Scorer:
    def __init__(self, model: Blip2, need_itm: bool) -> None:
        require(model, "retrieval", "capfilt", model.name, flag="--scorer")  # or a CLIP model
        self.model = model
        self.name = model.name
        self.key = ("blip2", model.cfg.vision.image_size, tuple(model.cfg.image_mean), tuple(model.cfg.image_std))

    def prepare(self, image: Image.Image) -> Tensor:
        return eval_pixel(image, self.key[1], self.key[2], self.key[3])

    def images(self, pixels: Tensor) -> ImageBatch:
        embeds = self.model.vision_embeds(pixels)  # (B, N, Dv): one pass per image, shared by all its texts
        return ImageBatch(self.model.image_features(embeds), embeds)

    def itc(self, batch: ImageBatch, b: int, texts: Sequence[str]) -> Tensor:
        return best_query_cosine(batch.vectors[b], self.model.text_features([clean_caption(t) for t in texts]))

    def itm(self, batch: ImageBatch, b: int, texts: Sequence[str]) -> Tensor:
        """The ITM head's match probability of each text with image b."""
        assert batch.embeds is not None
        embeds = batch.embeds[b : b + 1].expand(len(texts), -1, -1)
        logits = self.model.itm_logits(embeds, [clean_caption(t) for t in texts])
        return logits.float().softmax(dim=-1)[:, 1]


class ClipScorer:
    """transformers' CLIPModel and its own preprocessing (resize the short side, centre crop)."""

    def __init__(self, directory: Path, name: str, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.model = CLIPModel.from_pretrained(directory, dtype=dtype).to(device).eval()
        self.processor = CLIPImageProcessor.from_pretrained(directory)
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.name = name
        self.device = device
        self.key = ("clip", name)

    def prepare(self, image: Image.Image) -> Tensor:
        return self.processor(images=image, return_tensors="pt").pixel_values[0]

    def images(self, pixels: Tensor) -> ImageBatch:
        vectors = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
        if not isinstance(vectors, Tensor):  # transformers versions that return an output object
            vectors = vectors.pooler_output
        return ImageBatch(torch.nn.functional.normalize(vectors.float(), dim=-1)[:, None])  # (B, 1, D)

    def itc(self, batch: ImageBatch, b: int, texts: Sequence[str]) -> Tensor:
        limit = self.model.config.text_config.max_position_embeddings
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        vectors = self.model.get_text_features(input_ids=enc.input_ids.to(self.device),
                                               attention_mask=enc.attention_mask.to(self.device))
        if not isinstance(vectors, Tensor):
            vectors = vectors.pooler_output
        return best_query_cosine(batch.vectors[b], torch.nn.functional.normalize(vectors.float(), dim=-1))

    def itm(self, batch: ImageBatch, b: int, texts: Sequence[str]) -> Tensor:
        raise UsageError("--filter itm needs an ITM head: use a BLIP-2 scorer")


Scorer = Blip2Scorer | ClipScorer


def is_clip(name: str) -> bool:
    """A folder whose config.json says model_type "clip", or a hub id naming CLIP (openai/clip-vit-large-patch14)."""
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return json.loads((path / "config.json").read_text()).get("model_type") == "clip"
        except (OSError, json.JSONDecodeError, AttributeError):
            return False
    return not path.exists() and bool(re.search(r"(^|/|-)clip", name, re.I)) and "blip" not in name.lower()


def load_scorer(name: str, device: str, dtype: str, need_itm: bool, quantize: str = "none",
                revision: str | None = None, cache_dir: Path | None = None) -> Scorer:
    """--scorer: a CLIP model (folder or hub id), else anything --model takes; a hub id at `revision`, downloaded
    into `cache_dir`."""
    from blip2cli.model.load import download, load_model
    from blip2cli.model.placement import placement

    if is_clip(name):
        if need_itm:
            raise UsageError("--filter itm needs an ITM head: use a BLIP-2 scorer, not CLIP")
        if quantize != "none":
            raise UsageError("--quantize: CLIP scorers run unquantized; drop --quantize or use a BLIP-2 scorer")
        path = Path(name).expanduser()
        place = placement(device, dtype)
        if path.is_dir():
            return ClipScorer(path, name, place.device, place.vision)
        directory = download(name, revision=revision, cache_dir=cache_dir, fix="pass a local folder to --scorer")
        return ClipScorer(directory, name, place.device, place.vision)
    return Blip2Scorer(load_model(name, device, dtype, quantize=quantize, revision=revision, cache_dir=cache_dir),
                       need_itm)
