"""The CapFilt job: for each image, N nucleus-sampled captions, ranked with the original text by the scorer's ITC.

Per batch of images: one captioner image pass for the batch, then per image one sampling run of N rows (seeded by
the image's key, so a caption never depends on the batch, the process count or a resume); one scorer image pass
for the batch, shared by every text of an image. Optionally BLIP v1's filter: texts whose ITM match probability
is under a threshold are dropped. The top K by ITC are kept, best first.

Batches are fixed slices of each group (the same images share a batch however many processes run), so the
numbers of a run do not depend on how it was split.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from blip2cli.capfilt.output import JsonlOutput, ShardOutput
from blip2cli.capfilt.scorers import Scorer
from blip2cli.capfilt.sources import Group, Item
from blip2cli.config import GenerationOptions
from blip2cli.data.images import load_image, load_image_bytes
from blip2cli.data.transforms import clean_caption, eval_pixel
from blip2cli.errors import InputError, UsageError
from blip2cli.data.prefetch import prefetch
from blip2cli.model.blip2 import Blip2
from blip2cli.model.capabilities import require

T = TypeVar("T")
Progress = Callable[[Iterable[T], int, str], Iterable[T]]

DEFAULT_CAPTIONER = "Salesforce/blip2-opt-2.7b"
DEFAULT_SCORER = "Salesforce/blip2-itm-vit-g"


@dataclass(frozen=True)
class CapfiltSettings:
    """What a CapFilt run computes; recorded beside the output so a rerun with other settings is refused."""

    num_samples: int = 10  # captions sampled per image (BLIP-2: 10)
    keep: int = 2  # texts kept per image, best first (BLIP-2: the top 2, one sampled per training step)
    prompt: str = ""  # the captioner's prompt; kept captions are its continuation ("a picture of" for BLIP v1)
    top_p: float = 0.9  # nucleus sampling (BLIP v1 and BLIP-2 CapFilt)
    temperature: float = 1.0
    max_new_tokens: int = 30
    min_new_tokens: int = 5  # BLIP's captioner: min_length 5
    filter: Literal["none", "itm"] = "none"  # "itm": BLIP v1's filter, drop texts the ITM head judges unmatched
    threshold: float = 0.5  # ITM match probability a text needs to survive the filter
    seed: int = 0
    captioner: str = DEFAULT_CAPTIONER
    scorer: str = DEFAULT_SCORER
    quantize: str = "none"  # both models' frozen towers (--quantize): other weights, other captions and scores

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise UsageError(f"--num-samples: expected 0 or more, got {self.num_samples}")
        if self.keep < 1:
            raise UsageError(f"--keep: expected at least 1, got {self.keep}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold: expected a probability in [0, 1], got {self.threshold}")
        if self.filter not in ("none", "itm"):
            raise UsageError(f"--filter: expected none or itm, got {self.filter!r}")
        self.options()  # sampling values checked once, before any model loads

    def options(self) -> GenerationOptions:
        return GenerationOptions(
            num_beams=1, do_sample=True, top_p=self.top_p, temperature=self.temperature,
            max_new_tokens=self.max_new_tokens, min_new_tokens=min(self.min_new_tokens, self.max_new_tokens),
            num_return_sequences=max(self.num_samples, 1),
        )

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CapfiltReport:
    out: str
    images: int = 0  # images processed in this run
    kept: int = 0  # of them, images written with at least one text
    dropped: int = 0  # images whose every text the filter dropped
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image or shard, one-line reason)
    skipped: int = 0  # already done by an earlier run
    seconds: float = 0.0

    def record(self) -> dict[str, Any]:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return {"out": self.out, "images": self.images, "kept": self.kept, "dropped": self.dropped,
                "failed": [{"image": n, "error": e} for n, e in self.failed], "skipped": self.skipped,
                "images_per_s": round(rate, 3)}


@dataclass
class Result:
    """The output record of one image (None texts: it failed)."""

    item: Item
    captions: list[str]
    scores: list[float]
    sources: list[str]  # "original" or "synthetic", per kept text
    samples: list[str]  # every sampled caption, in sampling order
    itm: list[float] | None = None

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"image": self.item.name, "key": self.item.key, "original": self.item.original,
                                  "captions": self.captions, "scores": self.scores, "sources": self.sources,
                                  "samples": self.samples}
        if self.itm is not None:
            record["itm"] = self.itm
        return {**self.item.meta, **record}


def image_seed(seed: int, key: str) -> int:
    """A 63-bit seed per image: sampling depends on the image alone, not on batches or processes."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def check_captioner(captioner: Blip2, settings: CapfiltSettings) -> None:
    """What the job needs of the captioner, checked before any image is read (the scorer checks itself)."""
    if settings.num_samples:
        require(captioner, "caption", "capfilt", captioner.name, flag="--captioner")


# ---------------------------------------------------------------------------------------------------------------
# The run


def capfilt(
    captioner: Blip2,
    scorer: Scorer,
    groups: Sequence[Group],
    settings: CapfiltSettings,
    out: Path,
    *,
    batch_size: int = 8,
    workers: int = 2,
    progress: Progress | None = None,
    warn: Callable[[str], None] = lambda message: None,
) -> CapfiltReport | None:
    """Caption, score and keep; write to `out` (a .jsonl file, else a folder of shards). Under torchrun / accelerate
    launch (WORLD_SIZE > 1) each process takes every WORLD_SIZE-th batch (JSONL) or group (shards); rank 0 merges
    and reports, the other ranks return None."""
    check_captioner(captioner, settings)
    rank, world = _rank_world()
    sink = JsonlOutput(out, settings.record(), rank, world) if out.suffix == ".jsonl" else \
        ShardOutput(out, settings.record(), rank, world)
    report = CapfiltReport(str(out))
    for group in groups:
        for message in group.errors:
            warn(message)
            report.failed.append((group.name, message))
    started = time.perf_counter()
    work = sink.todo(groups, batch_size, report)
    total = sum(len(batch) for _, batch in work)
    results = _results(captioner, scorer, work, settings, report, workers, warn)
    for group, item, result in progress(results, total, "capfilt") if progress is not None else results:
        if sink.add(group, item, result) and result is not None:  # False: done by an earlier run
            report.images += 1
            report.kept += bool(result.captions)
            report.dropped += not result.captions
    sink.close()
    report.seconds = time.perf_counter() - started
    return sink.merge(report)


def _rank_world() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def _results(
    captioner: Blip2, scorer: Scorer, work: list[tuple[Group, list[Item]]], settings: CapfiltSettings,
    report: CapfiltReport, workers: int, warn: Callable[[str], None],
) -> Iterator[tuple[Group, Item, Result | None]]:
    """(group, item, result) for every image of every batch, in order; None: the image could not be used."""
    for group, batch in _decoded(work, captioner, scorer, workers):
        good = [(item, px) for item, px in batch if not isinstance(px, str)]
        results = iter(process_batch(captioner, scorer, good, settings) if good else [])
        for item, px in batch:
            if isinstance(px, str):
                warn(f"{item.name}: {px}")
                report.failed.append((item.name, px))
                yield group, item, None
                continue
            yield group, item, next(results)


def _decoded(work, captioner: Blip2, scorer: Scorer, workers: int
             ) -> Iterator[tuple[Group, list[tuple[Item, Pixels | str]]]]:
    """Batches with their images decoded and resized in background threads, ahead of the model."""
    ahead = 2 * max((len(batch) for _, batch in work), default=1)  # two batches
    items = (item for _, batch in work for item in batch)
    pixels = prefetch(items, lambda item: _pixels(item, captioner, scorer), threads=workers, ahead=ahead)
    for group, batch in work:
        yield group, [(item, next(pixels)) for item in batch]


@dataclass
class Pixels:
    captioner: torch.Tensor  # (3, S, S)
    scorer: torch.Tensor  # (3, S', S'), the same tensor when both models preprocess alike


def _pixels(item: Item, captioner: Blip2, scorer: Scorer) -> Pixels | str:
    """Each model's input, or the one-line reason the image cannot be used."""
    try:
        image = load_image(item.path) if item.data is None else load_image_bytes(item.data, item.name)
    except InputError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    c = captioner.cfg
    spec = ("blip2", c.vision.image_size, tuple(c.image_mean), tuple(c.image_std))
    px = eval_pixel(image, spec[1], spec[2], spec[3])
    return Pixels(px, px if scorer.key == spec else scorer.prepare(image))


@torch.no_grad()
def process_batch(
    captioner: Blip2, scorer: Scorer, batch: Sequence[tuple[Item, Pixels]], settings: CapfiltSettings
) -> list[Result]:
    """The three steps for a batch of decoded images: sample, score, keep."""
    cap_px = torch.stack([px.captioner for _, px in batch])  # (B, 3, S, S)
    samples = sample_captions(captioner, cap_px, [item.key for item, _ in batch], settings)
    images = scorer.images(torch.stack([px.scorer for _, px in batch]))  # one pass, shared by every text
    results = []
    for b, (item, _) in enumerate(batch):
        texts, sources = candidates(item.original, samples[b])
        if not texts:  # no original and every sample empty: nothing to keep
            results.append(Result(item, [], [], [], list(samples[b])))
            continue
        itc = scorer.itc(images, b, texts)  # (T,) best query's cosine
        itm = scorer.itm(images, b, texts) if settings.filter == "itm" else None  # (T,) match probability
        results.append(select(item, texts, sources, itc, itm, samples[b], settings))
    return results


def sample_captions(captioner: Blip2, pixels: torch.Tensor, keys: Sequence[str], s: CapfiltSettings) -> list[list[str]]:
    """N sampled captions per image: one image pass for the batch, one seeded sampling run per image."""
    if s.num_samples == 0:
        return [[] for _ in keys]
    options = s.options()
    embeds = captioner.vision_embeds(pixels)  # (B, N, Dv), once per image
    prefix = captioner.llm_prefix(embeds) if captioner.llm is not None else None
    devices = [captioner.device] if captioner.device.type == "cuda" else []
    out = []
    for b, key in enumerate(keys):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(image_seed(s.seed, key))
            if prefix is not None:
                texts = captioner.llm.generate(prefix[b : b + 1], [s.prompt], options)[0]
            else:
                from blip2cli.model.qformer_generate import qformer_generate

                texts = qformer_generate(captioner, embeds[b : b + 1], options)[0]
        out.append([t.strip() for t in texts])
    return out


def candidates(original: str | None, samples: Sequence[str]) -> tuple[list[str], list[str]]:
    """The original text first, then the distinct samples; repeats (after cleaning) are scored once."""
    texts, sources, seen = [], [], set()
    for text, source in [(original, "original")] + [(t, "synthetic") for t in samples]:
        cleaned = clean_caption(text) if text else ""
        if not cleaned or cleaned in seen:
            continue
        seen.add(cleaned)
        texts.append(text)
        sources.append(source)
    return texts, sources


def select(item: Item, texts: list[str], sources: list[str], itc: torch.Tensor, itm: torch.Tensor | None,
           samples: list[str], s: CapfiltSettings) -> Result:
    """Top K by ITC among the texts the filter lets through (ties: the earlier text, the original first)."""
    allowed = [i for i in range(len(texts)) if itm is None or float(itm[i]) >= s.threshold]
    order = sorted(allowed, key=lambda i: (-float(itc[i]), i))[: s.keep]
    return Result(item, [texts[i] for i in order], [round(float(itc[i]), 6) for i in order],
                  [sources[i] for i in order], list(samples),
                  None if itm is None else [round(float(itm[i]), 6) for i in order])
