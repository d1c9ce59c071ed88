"""Frozen-feature cache: the frozen ViT's output per image on disk, so epochs after the first skip the ViT
and the JPEG decoding.

What is cached is ViT(x) *before* `ln_vision`, which is trained in every stage. This is only valid when the
image a sample produces never changes (no augmentation: `data.augment: false`) and the ViT is frozen; the
recipe checks both. One row per distinct image path, in the tower's dtype (bf16 stored as its 16 bits), in a
memory-mapped file that DataLoader workers read and the training process fills:

    features.bin   (rows, N, Dv) raw values        filled.bin   one byte per row, 1 once written
    meta.json      {"keys": [...], "shape", "dtype", "source"}: a different ViT, size or image list starts over

At ViT-g/14, 224 px, bf16 a row is 257 x 1408 x 2 B = 0.72 MB (COCO's 113k images: 82 GB). Rows are written
by whichever rank computed them; ranks share one machine's disk (not safe across nodes without a shared disk).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


class FeatureCache:
    """Rows of frozen ViT features keyed by image path; readable from worker processes after a fork."""

    def __init__(self, folder: str | Path, keys: Sequence[str], shape: tuple[int, int], dtype: torch.dtype,
                 source: str, writer: bool = True) -> None:
        self.folder = Path(folder)
        self.keys = list(dict.fromkeys(keys))  # distinct, first-seen order
        self.row = {k: i for i, k in enumerate(self.keys)}
        self.shape, self.dtype, self.source = tuple(shape), dtype, source
        self._features: np.memmap | None = None
        self._filled: np.memmap | None = None
        if writer:
            self._prepare()

    def _meta(self) -> dict:
        return {"keys": self.keys, "shape": list(self.shape), "dtype": str(self.dtype), "source": self.source}

    def _prepare(self) -> None:
        """Create the files, or keep them when they describe the same ViT and images."""
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_file = self.folder / "meta.json"
        same = meta_file.is_file() and json.loads(meta_file.read_text()) == self._meta()
        if not same:
            rows = (len(self.keys), *self.shape)
            np.memmap(self.folder / "features.bin", dtype=_STORAGE[self.dtype], mode="w+", shape=rows).flush()
            np.memmap(self.folder / "filled.bin", dtype=np.uint8, mode="w+", shape=(len(self.keys),)).flush()
            meta_file.write_text(json.dumps(self._meta()))

    def _open(self, writable: bool) -> None:
        if self._features is None or (writable and self._features.mode != "r+"):
            mode = "r+" if writable else "r"
            rows = (len(self.keys), *self.shape)
            self._features = np.memmap(self.folder / "features.bin", dtype=_STORAGE[self.dtype], mode=mode, shape=rows)
            self._filled = np.memmap(self.folder / "filled.bin", dtype=np.uint8, mode=mode, shape=(len(self.keys),))

    def __getstate__(self) -> dict:  # workers reopen the maps after the fork / spawn
        return {**self.__dict__, "_features": None, "_filled": None}

    def get(self, key: str) -> Tensor | None:
        """The cached (N, Dv) features of `key`, or None when not computed yet."""
        self._open(writable=False)
        row = self.row.get(key)
        if row is None or not self._filled[row]:
            return None
        values = torch.from_numpy(np.array(self._features[row]))  # a copy: the map may be rewritten later
        return values.view(self.dtype) if self.dtype == torch.bfloat16 else values

    def put(self, keys: Sequence[str], features: Tensor) -> None:
        """Store (B, N, Dv) features of images in the cache's key list; rows are flagged once their values are
        written, so a reader never sees a flagged row half written."""
        self._open(writable=True)
        values = features.detach().to("cpu", self.dtype)
        if self.dtype == torch.bfloat16:
            values = values.view(torch.int16)
        known = [i for i, k in enumerate(keys) if k in self.row]  # held-out images are not cached
        if not known:
            return
        rows = [self.row[keys[i]] for i in known]
        self._features[rows] = values[known].numpy()
        self._features.flush()
        self._filled[rows] = 1
        self._filled.flush()

    def filled(self) -> int:
        self._open(writable=False)
        return int(np.count_nonzero(self._filled))


class CachedVision(nn.Module):
    """Stands in for the frozen image tower: (B, 3, S, S) pixels go through the tower, (B, N, Dv) features
    (already the tower's output, from the cache) pass through. `Blip2.vision_embeds` then applies ln_vision."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.inner = tower

    @property
    def width(self) -> int:
        return self.inner.width

    def forward(self, x: Tensor) -> Tensor:
        return x if x.dim() == 3 else self.inner(x)
