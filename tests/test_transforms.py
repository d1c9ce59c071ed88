"""Image processors and text cleaning (LAVIS processors) and the Flan-T5 prefix split (LAVIS Blip2T5)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from blip2cli.config import CLIP_MEAN, CLIP_STD
from blip2cli.data.transforms import (
    BlipRandAugment,
    TrainTransform,
    clean_caption,
    clean_question,
    eval_pixels,
    split_prefix,
)


def _noise(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# eval_pixels


def test_eval_pixels_matches_transformers_pil_processor() -> None:
    """Parity with transformers' PIL-backed BLIP processor.

    In transformers 5.23 `BlipImageProcessor` is the torchvision ("fast") backend; the slow PIL backend that
    matches LAVIS is the separate class `BlipImageProcessorPil` (models/blip/image_processing_pil_blip.py, a
    `PilBackend`: do_convert_rgb, PIL BICUBIC resize to height x width, rescale 1/255, normalise), which is also
    what `AutoImageProcessor.from_pretrained(..., backend="pil")` (formerly `use_fast=False`) returns."""
    transformers = pytest.importorskip("transformers")
    processor = transformers.BlipImageProcessorPil(
        size={"height": 32, "width": 32}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
    )
    assert processor.backend == "pil"
    images = [_noise(37, 53, 0), _noise(64, 48, 1, mode="L"), _noise(20, 20, 2)]
    expected = processor(images, return_tensors="pt")["pixel_values"]
    ours = eval_pixels(images, 32)
    assert ours.shape == (3, 3, 32, 32) and ours.dtype == torch.float32
    assert (ours - expected).abs().max().item() < 1e-6


def test_eval_pixels_hand_values() -> None:
    """A flat colour survives bicubic resizing exactly, so each channel is (v/255 - mean) / std."""
    pixels = eval_pixels([Image.new("RGB", (50, 30), (255, 0, 128))], 8)
    rgb = (1.0, 0.0, 128 / 255)
    expected = [(v - m) / s for v, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)]
    assert pixels.shape == (1, 3, 8, 8)
    assert torch.allclose(pixels[0, :, 4, 4], torch.tensor(expected), atol=1e-6)
    assert torch.allclose(pixels, pixels[:, :, :1, :1].expand_as(pixels))


def test_eval_pixels_uses_pil_bicubic_not_tensor_resize() -> None:
    image = _noise(37, 53, 3)
    reference = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    got = eval_pixels([image], 16)[0].permute(1, 2, 0).double() * torch.tensor(CLIP_STD) + torch.tensor(CLIP_MEAN)
    assert np.abs(got.numpy() - reference).max() < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# TrainTransform


@pytest.mark.parametrize("randaugment", [False, True])
def test_train_transform_shape_and_seeded_reproducibility(randaugment: bool) -> None:
    transform = TrainTransform(24, randaugment=randaugment)
    image = _noise(40, 60, 4)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    assert torch.equal(first, transform(image))
    assert first.shape == (3, 24, 24) and first.dtype == torch.float32


def test_train_transform_flat_image_keeps_its_colour() -> None:
    """Crops and flips of a flat image change nothing: the result is the normalised colour."""
    torch.manual_seed(1)
    out = TrainTransform(16)(Image.new("RGB", (30, 20), (255, 255, 255)))
    assert torch.allclose(out[:, 0, 0], (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD), atol=1e-6)


def test_randaugment_ops_all_run_and_keep_size() -> None:
    augment = BlipRandAugment(num_ops=2, magnitude=5)
    image = _noise(24, 24, 5)
    for op in BlipRandAugment.OPS:
        out = augment._apply(op, image)
        assert out.size == image.size and out.mode == "RGB"


# ---------------------------------------------------------------------------------------------------------------
# Text


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("A man riding a horse.", "a man riding a horse"),
        ('  Two dogs (brown & white) play!!  "fetch" ', "two dogs brown & white play fetch"),
        ("time: 5 ; day~night * #1", "time 5 day night 1"),
        ("Is it red?, yes", "is it red?, yes"),  # ? and , stay
        ("a\tcat\n\non a mat.\n", "a cat on a mat"),
        ("...", ""),
    ],
)
def test_clean_caption(raw: str, expected: str) -> None:
    assert clean_caption(raw) == expected


def test_clean_caption_truncates_then_prepends_prompt() -> None:
    assert clean_caption("One two three four five.", max_words=3) == "one two three"
    assert clean_caption("A DOG.", prompt="a photo of ") == "a photo of a dog"
    assert len(clean_caption(" ".join(["word"] * 80)).split()) == 50


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("What colour is the cat?", "what colour is the cat?"),
        ('Is "this" (a) dog, or not?  ', "is this a dog, or not?"),
        ("How many: people.", "how many people"),  # deleted, not replaced by a space
    ],
)
def test_clean_question(raw: str, expected: str) -> None:
    assert clean_question(raw) == expected


def test_clean_question_truncates() -> None:
    assert clean_question("a b c d e?", max_words=3) == "a b c"


def test_split_prefix_rule() -> None:
    rng = random.Random(0)
    assert split_prefix("dog", rng) == ("", "dog")
    assert split_prefix("", rng) == ("", "")
    assert split_prefix("a dog", rng) == ("a", "dog")
    assert split_prefix("a dog runs", rng) == ("a", "dog runs")  # n // 2 == 1


def test_split_prefix_k_is_uniform_up_to_half() -> None:
    rng = random.Random(0)
    caption = "one two three four five six seven eight nine ten"
    ks = [len(split_prefix(caption, rng)[0].split()) for _ in range(2000)]
    assert set(ks) == {1, 2, 3, 4, 5}
    assert all(250 < ks.count(k) < 550 for k in range(1, 6))
    prefix, rest = split_prefix(caption, rng)
    assert f"{prefix} {rest}" == caption
