"""BLIP-2's image and text processors (LAVIS processors), and the Flan-T5 prefix-LM split (LAVIS Blip2T5).

Images: `eval_pixels` is LAVIS's `blip_image_eval` (PIL bicubic resize to S x S, no crop); `TrainTransform`
is `blip2_image_train`, or `blip_image_train` with `randaugment=True`. Random choices use torch's global RNG
(through torchvision and `torch.rand`), which the trainer seeds per rank and DataLoader seeds per worker.
Text: `clean_caption` (`blip_caption`) and `clean_question` (`blip_question`) run before any tokenizer.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from blip2cli.config import CLIP_MEAN, CLIP_STD

# ---------------------------------------------------------------------------------------------------------------
# Images


def eval_pixels(
    images: Sequence[Image.Image],
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Images -> normalised pixels (B, 3, size, size), float32.

    LAVIS processors: the resize is PIL's bicubic on the decoded RGB image, as LAVIS does; a tensor resize differs by
    up to 10/255 per pixel and moves ITC/ITM scores by ~1e-3. The aspect ratio is not kept and nothing is cropped."""
    return torch.stack([eval_pixel(image, size, mean, std) for image in images])  # (B, 3, S, S)


def eval_pixel(image: Image.Image, size: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """One image's `eval_pixels` (3, size, size), for decode threads: no torch operation runs (torch.stack of even
    one image is a parallel copy, and a thread's first parallel op starts an OpenMP team of its own whose waiting
    threads spun beside the model's: captioning from files ran 1.7x slower on 2 cores)."""
    return _normalized(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), mean, std)


class TrainTransform:
    """Training augmentation: random resized crop (scale 0.5-1.0, bicubic) -> horizontal flip -> [RandAugment]
    -> normalise. LAVIS: `blip2_image_train` (COCO) and, with `randaugment`, `blip_image_train` (VG)."""

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        randaugment: bool = False,
        scale: tuple[float, float] = (0.5, 1.0),
    ) -> None:
        self.crop = v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC)
        self.flip = v2.RandomHorizontalFlip()
        self.augment = BlipRandAugment() if randaugment else None
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> (3, S, S) float32. Crop, flip and augmentation act on the PIL image (PIL bicubic)."""
        image = self.flip(self.crop(image.convert("RGB")))
        if self.augment is not None:
            image = self.augment(image)
        return _normalized(image, self.mean, self.std)


class BlipRandAugment:
    """`blip_image_train`'s RandAugment: `num_ops` operations drawn with replacement from the spec's list, each
    applied with probability 0.5, at `magnitude` out of 10.

    The op list is LAVIS processors's (no colour, contrast, posterize or solarize, unlike torchvision's RandAugment).
    Strengths at full magnitude follow LAVIS's RandomAugment as we read it (to verify against its source):
    enhance factor 0.1-1.9 (so Brightness and Sharpness are no-ops at magnitude 5), shear 0.3, translation
    10 px, rotation 30 degrees, random sign, grey (128) fill."""

    OPS = ("identity", "autocontrast", "brightness", "sharpness", "equalize",
           "shear_x", "shear_y", "translate_x", "translate_y", "rotate")  # fmt: skip

    def __init__(self, num_ops: int = 2, magnitude: int = 5) -> None:
        self.num_ops = num_ops
        self.level = magnitude / 10

    def __call__(self, image: Image.Image) -> Image.Image:
        for _ in range(self.num_ops):
            op = self.OPS[int(torch.randint(len(self.OPS), ()))]
            if float(torch.rand(())) < 0.5:
                image = self._apply(op, image)
        return image

    def _apply(self, op: str, image: Image.Image) -> Image.Image:
        sign = 1.0 if float(torch.rand(())) < 0.5 else -1.0
        factor = self.level * 1.8 + 0.1
        if op == "autocontrast":
            return F.autocontrast(image)
        if op == "equalize":
            return F.equalize(image)
        if op == "brightness":
            return F.adjust_brightness(image, factor)
        if op == "sharpness":
            return F.adjust_sharpness(image, factor)
        if op in ("shear_x", "shear_y"):
            degrees = sign * math.degrees(math.atan(self.level * 0.3))
            return _affine(image, shear=(degrees, 0.0) if op == "shear_x" else (0.0, degrees))
        if op in ("translate_x", "translate_y"):
            pixels = round(sign * self.level * 10)
            return _affine(image, translate=(pixels, 0) if op == "translate_x" else (0, pixels))
        if op == "rotate":
            return _affine(image, angle=sign * self.level * 30)
        return image  # identity


def _affine(
    image: Image.Image, angle: float = 0.0, translate: tuple[int, int] = (0, 0), shear: tuple[float, float] = (0.0, 0.0)
) -> Image.Image:
    return F.affine(
        image, angle=angle, translate=list(translate), scale=1.0, shear=list(shear),
        interpolation=InterpolationMode.BILINEAR, fill=[128, 128, 128],
    )  # fmt: skip


def _normalized(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 HWC -> normalised float32 CHW. Computed in float64 and rounded once, so the result is the exact
    value to float32 precision (transformers' PIL processor agrees to ~1e-7)."""
    # numpy rather than torch: this runs in decode threads, where torch's small ops spin OpenMP threads
    x = (np.asarray(image, dtype=np.float64) / 255.0 - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))  # (3, H, W)


# ---------------------------------------------------------------------------------------------------------------
# Text

# The punctuation `blip_caption` turns into spaces and `blip_question` deletes (LAVIS processors); `?` and `,` stay.
_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str, max_words: int = 50, prompt: str = "") -> str:
    """`blip_caption`: lowercase, punctuation -> space, collapse whitespace, strip, keep `max_words` words,
    prepend `prompt` (which carries its own trailing space, e.g. "a photo of ").

    LAVIS collapses only runs of 2+ whitespace characters, so a lone tab or newline survives there; the spec
    says "collapse whitespace", and we collapse every run to one space so no tokenizer sees a stray tab."""
    caption = _PUNCTUATION.sub(" ", text.lower())
    words = _WHITESPACE.sub(" ", caption).strip().split(" ")
    return prompt + " ".join(words[:max_words])


def clean_question(text: str, max_words: int = 50) -> str:
    """`blip_question`: lowercase, delete the punctuation (the `?` stays), strip, keep `max_words` words.

    LAVIS's processor right-strips; we strip both ends (VQAv2 questions never start with a space, so parity holds)."""
    question = _PUNCTUATION.sub("", text.lower()).strip()
    return " ".join(question.split(" ")[:max_words])


def split_prefix(caption: str, rng: random.Random) -> tuple[str, str]:
    """Flan-T5 prefix-LM split (LAVIS Blip2T5): k ~ U{1..max(1, n // 2)} of the n words go to the encoder
    (`text_input`), the rest is the decoder target (`text_output`). A one-word caption has an empty prefix."""
    words = caption.split()
    if len(words) <= 1:
        return "", " ".join(words)
    k = rng.randint(1, max(1, len(words) // 2))
    return " ".join(words[:k]), " ".join(words[k:])
