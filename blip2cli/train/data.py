"""Training batches from a recipe's `data` section: datasets (data/datasets.py), image transforms and the text
each task feeds the model, in an order that a resumed run reproduces exactly.

Map-style sources (annotation files, folders): every epoch, each source contributes round(weight * len) draws,
all shuffled together by a generator seeded with (seed, epoch); rank r of W takes micro-batch slice r of each
round of micro * W samples, and a last partial round is dropped (the ITC/ITM gathers need equal batches). A
sample's randomness (crop, flip, caption choice, prefix split) is seeded by its draw number, so the batches do
not depend on worker count, and resuming at micro-batch k gives the same batches as never stopping.

Shard streams (webdataset) are split by node and worker in the pipeline (ecosystem §5) and never passed to
Accelerate; they run endlessly with a nominal epoch of `size` samples, and a resumed run starts a fresh shuffle.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from blip2cli.config import DataSource, Recipe
from blip2cli.data.datasets import ImageTextDataset, build_dataset
from blip2cli.data.transforms import TrainTransform, eval_pixel, split_prefix
from blip2cli.errors import UsageError
from blip2cli.train.feature_cache import FeatureCache


@dataclass
class Batch:
    """One micro-batch as the objective consumes it. B samples; M <= B of them have pixels."""

    texts: list[str]  # Q-Former text (stage 1), LLM text with its prompt (decoder-only), or encoder text (T5)
    image_ids: Tensor  # (B,) int64, global image ids (multi-positive ITC)
    keys: list[str]  # image paths: the feature cache's keys
    pixels: Tensor | None = None  # (M, 3, S, S): samples whose frozen features are not cached
    features: Tensor | None = None  # (B, N, Dv) cached ViT output, rows valid where `cached`
    cached: Tensor | None = None  # (B,) bool
    outputs: list[str] | None = None  # decoder targets (Flan-T5)
    prompts: list[str] | None = None  # per-sample prompts kept out of the loss (VQA on a decoder-only LLM)

    def __len__(self) -> int:
        return len(self.texts)

    def to(self, device: torch.device) -> Batch:
        move = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in move.items():
            if isinstance(value, Tensor):
                move[name] = value.to(device, non_blocking=True)
        return Batch(**move)


def collate(samples: list[dict[str, Any]]) -> Batch:
    with_pixels = [s["pixels"] for s in samples if "pixels" in s]
    cached = [s.get("features") for s in samples]
    batch = Batch(
        texts=[s["input"] for s in samples],
        image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        keys=[s["path"] for s in samples],
        pixels=torch.stack(with_pixels) if with_pixels else None,
        outputs=[s["output"] for s in samples] if "output" in samples[0] else None,
        prompts=[s["prompt"] for s in samples] if "prompt" in samples[0] else None,
    )
    if any(c is not None for c in cached):
        example = next(c for c in cached if c is not None)
        batch.features = torch.stack([c if c is not None else torch.zeros_like(example) for c in cached])
        batch.cached = torch.tensor([c is not None for c in cached])
    return batch


# ---------------------------------------------------------------------------------------------------------------
# What the model reads: per task and LLM kind (LAVIS Blip2OPT/T5)


@dataclass(frozen=True)
class TextFormat:
    """A sample's text -> {"input", "output"?, "prompt"?}.

    qformer        stage 1 / retrieval: the caption
    decoder        OPT-style stage 2 / caption fine-tune: "prompt caption" (the prompt is masked in the loss)
    seq2seq_split  Flan-T5 stage 2: prefix-LM split (LAVIS Blip2T5), the prompt (if any) in front of the prefix
    seq2seq_prompt Flan-T5 caption fine-tune: encoder = the prompt, target = the caption (LAVIS Blip2T5)
    vqa_decoder    "Question: q Answer: a", the question part masked per sample
    vqa_seq2seq    encoder = "Question: q Answer:", target = an answer
    """

    mode: str
    prompt: str = ""
    template: str = ""

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, str]:
        text = sample["text"]
        if self.mode == "qformer":
            return {"input": text}
        if self.mode == "decoder":
            return {"input": f"{self.prompt} {text}" if self.prompt else text}
        if self.mode == "seq2seq_split":
            prefix, target = split_prefix(text, rng)
            return {"input": f"{self.prompt} {prefix}".strip(), "output": target}
        if self.mode == "seq2seq_prompt":
            return {"input": self.prompt, "output": text}
        question = self.template.format(text)
        answer = rng.choice(sample["answers"]).strip().lower()  # VQAv2: one of the ten, frequent ones more often
        if self.mode == "vqa_decoder":
            return {"input": f"{question} {answer}", "prompt": question}
        return {"input": question, "output": answer}


def text_format(recipe: Recipe, seq2seq: bool) -> TextFormat:
    prompt, template = recipe.model.llm.prompt, recipe.data.question_template
    if not recipe.uses_llm:
        return TextFormat("qformer")
    if recipe.task == "vqa":
        return TextFormat("vqa_seq2seq" if seq2seq else "vqa_decoder", prompt, template)
    if seq2seq:
        return TextFormat("seq2seq_prompt" if recipe.task == "caption" else "seq2seq_split", prompt)
    return TextFormat("decoder", prompt)


class EvalTransform:
    """The eval resize (bicubic S x S, no crop) for one image; used when augmentation is off."""

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: Image.Image) -> Tensor:
        return eval_pixel(image, self.size, self.mean, self.std)


def image_transform(recipe: Recipe, train: bool = True) -> Callable[[Image.Image], Tensor]:
    m, d = recipe.model, recipe.data
    if train and d.augment:
        return TrainTransform(m.vision.image_size, m.image_mean, m.image_std, d.randaugment, d.crop_scale)
    return EvalTransform(m.vision.image_size, m.image_mean, m.image_std)


# ---------------------------------------------------------------------------------------------------------------
# Sources


def build_sources(sources: list[DataSource], split: str, recipe: Recipe) -> list[Dataset | IterableDataset]:
    """Datasets for the recipe's entries; VQA needs question lines and the other tasks captions."""
    built = []
    for i, source in enumerate(sources):
        key = f"data.{split}[{i}]"
        try:
            dataset = build_dataset(source)
        except UsageError as exc:
            raise UsageError(f"{key}: {exc}") from None
        if isinstance(dataset, ImageTextDataset):
            has_questions = dataset.records[0].question is not None
            if has_questions != (recipe.task == "vqa"):
                want = "questions with answers" if recipe.task == "vqa" else "captions"
                raise UsageError(f"{key}.path: {recipe.name} trains on {want}, but {source.path} holds the other")
        built.append(dataset)
    return built


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's and Python's global generators for one sample, then put the previous states back."""
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def sample_seed(seed: int, *parts: int) -> int:
    return hash((seed, *parts)) & (2**63 - 1)  # hashes of int tuples are stable across processes


class TrainSamples(Dataset):
    """Map-style sources addressed by (source, index, draw); `draw` seeds the sample's randomness."""

    def __init__(self, sources: list[ImageTextDataset], transform: Callable, text: TextFormat, seed: int,
                 cache: FeatureCache | None = None) -> None:
        self.sources, self.transform, self.text, self.seed, self.cache = sources, transform, text, seed, cache

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, item: tuple[int, int, int]) -> dict[str, Any]:
        source, index, draw = item
        with seeded(sample_seed(self.seed, draw)):
            sample = self._cached(source, index)
            if sample is None:
                sample = self.sources[source][index]
                sample["pixels"] = self.transform(sample.pop("image"))
            sample.update(self.text(sample, random.Random(sample_seed(self.seed, draw, 1))))
        return sample

    def _cached(self, source: int, index: int) -> dict[str, Any] | None:
        """The sample without decoding its image, when the frozen features are in the cache."""
        if self.cache is None:
            return None
        dataset = self.sources[source]
        record = dataset.records[index]
        features = self.cache.get(str(record.image))
        if features is None:
            return None
        sample = dataset._sample(record, None)  # texts only; the image is never opened
        sample.pop("image")
        sample["features"] = features
        return sample


class EpochPlan:
    """Which (source, index, draw) each rank reads, epoch after epoch (see the module docstring)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, micro: int, world: int, rank: int) -> None:
        self.sizes, self.seed, self.micro, self.world, self.rank = sizes, seed, micro, world, rank
        self.draws = [max(1, round(w * n)) for w, n in zip(weights, sizes)]
        self.per_epoch = sum(self.draws)
        self.batches_per_epoch = self.per_epoch // (micro * world)  # per rank
        if self.batches_per_epoch == 0:
            raise UsageError(f"data.train: {self.per_epoch} samples per epoch cannot fill one batch of "
                             f"{micro} x {world} processes (train.micro_batch_size)")

    def epoch(self, epoch: int) -> tuple[Tensor, Tensor]:
        """(source, index) of every draw of `epoch`, in order."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 7))
        src, idx = [], []
        for s, (n, draws) in enumerate(zip(self.sizes, self.draws)):
            passes = [torch.randperm(n, generator=g) for _ in range(-(-draws // n))]
            idx.append(torch.cat(passes)[:draws])
            src.append(torch.full((draws,), s))
        order = torch.randperm(self.per_epoch, generator=g)
        return torch.cat(src)[order], torch.cat(idx)[order]

    def batches(self, start: int) -> Iterator[list[tuple[int, int, int]]]:
        """This rank's micro-batches from per-rank micro-batch number `start` on, endlessly."""
        epoch, offset = divmod(start, self.batches_per_epoch)
        while True:
            src, idx = self.epoch(epoch)
            for b in range(offset, self.batches_per_epoch):
                lo = b * self.micro * self.world + self.rank * self.micro
                yield [(int(src[j]), int(idx[j]), epoch * self.per_epoch + j) for j in range(lo, lo + self.micro)]
            epoch, offset = epoch + 1, 0


class _Batches:
    """A batch sampler over an EpochPlan (DataLoader calls iter() once: the loader is iterated once, endlessly)."""

    def __init__(self, plan: EpochPlan, start: int) -> None:
        self.plan, self.start = plan, start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        return self.plan.batches(self.start)


class StreamSamples(IterableDataset):
    """Shard streams mixed by weight, restarted when they run out (endless), transformed per sample."""

    def __init__(self, streams: list[IterableDataset], weights: list[float], transform: Callable, text: TextFormat,
                 seed: int, rank: int) -> None:
        self.streams, self.weights = streams, weights
        self.transform, self.text, self.seed, self.rank = transform, text, seed, rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        wid = worker.id if worker is not None else 0
        pick = random.Random(sample_seed(self.seed, self.rank, wid))
        its = [iter(s) for s in self.streams]
        for count in itertools.count():
            s = pick.choices(range(len(its)), self.weights)[0]
            try:
                sample = next(its[s])
            except StopIteration:
                its[s] = iter(self.streams[s])
                sample = next(its[s], None)
                if sample is None:
                    raise UsageError("a shard stream yielded no samples (fewer shards than processes x workers?)")
            with seeded(sample_seed(self.seed, self.rank, wid, count)):
                sample["pixels"] = self.transform(sample.pop("image"))
                sample.update(self.text(sample, random.Random(sample_seed(self.seed, self.rank, wid, count, 1))))
            yield sample


# ---------------------------------------------------------------------------------------------------------------
# Loaders


@dataclass
class TrainData:
    """The endless batch stream of one rank and the epoch length used for logging and the lavis_epoch schedule."""

    loader: DataLoader
    batches_per_epoch: int  # per rank, micro-batches
    exact_resume: bool  # map-style: resuming reproduces the batches; streams restart their shuffle

    def batches(self) -> Iterator[Batch]:
        return iter(self.loader)

    def attach_cache(self, cache: FeatureCache) -> None:
        """Read cached frozen features instead of images (before the first batch is drawn)."""
        self.loader.dataset.cache = cache

    def cache_keys(self) -> list[str]:
        """Every image path of the (map-style) sources, the feature cache's rows."""
        return [str(r.image) for source in self.loader.dataset.sources for r in source.records]


def _loader(dataset: Dataset | IterableDataset, recipe: Recipe, seed: int, **kwargs: Any) -> DataLoader:
    workers = recipe.data.num_workers
    return DataLoader(
        dataset, collate_fn=collate, num_workers=workers, pin_memory=torch.cuda.is_available(),
        persistent_workers=False, generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
        prefetch_factor=4 if workers else None, **kwargs,
    )


def build_train_data(recipe: Recipe, seq2seq: bool, rank: int, world: int, start: int,
                     cache: FeatureCache | None = None) -> TrainData:
    """Rank `rank`'s training batches, from its micro-batch number `start` on."""
    sources = build_sources(recipe.data.train, "train", recipe)
    text, transform = text_format(recipe, seq2seq), image_transform(recipe)
    t, weights = recipe.train, [s.weight for s in recipe.data.train]
    if isinstance(sources[0], IterableDataset):
        sizes = [s.size for s in recipe.data.train]
        if world > 1 and not all(sizes):
            raise UsageError("data.train: shards need `size` (samples per epoch) when training on several "
                             "processes, so every rank runs the same number of steps")
        if start:
            warnings.warn("resuming a shard stream: the data restarts with a fresh shuffle", stacklevel=2)
        stream = StreamSamples(sources, weights, transform, text, t.seed + start, rank)
        per_epoch = sum(sizes) // (t.micro_batch_size * world) if all(sizes) else 0
        loader = _loader(stream, recipe, t.seed, batch_size=t.micro_batch_size, drop_last=True)
        return TrainData(loader, max(per_epoch, 1), exact_resume=False)
    plan = EpochPlan([len(s) for s in sources], weights, t.seed, t.micro_batch_size, world, rank)
    samples = TrainSamples(sources, transform, text, t.seed, cache)
    loader = _loader(samples, recipe, t.seed, batch_sampler=_Batches(plan, start))
    return TrainData(loader, plan.batches_per_epoch, exact_resume=True)


class ValBatches:
    """The held-out batches the eval hook scores: the same samples every time, eval transform, read lazily."""

    def __init__(self, make: Callable[[], Iterator[Batch]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[Batch]:
        return self.make()


def build_val_batches(recipe: Recipe, seq2seq: bool, rank: int, world: int) -> ValBatches | None:
    """None without data.val. Map-style: the first val_batches rounds of the sources in file order."""
    if not recipe.data.val:
        return None
    sources = build_sources(recipe.data.val, "val", recipe)
    text, transform = text_format(recipe, seq2seq), image_transform(recipe, train=False)
    micro, n = recipe.train.micro_batch_size, recipe.data.val_batches
    if isinstance(sources[0], IterableDataset):
        dataset = StreamSamples(sources, [s.weight for s in recipe.data.val], transform, text, 0, rank)
        loader = DataLoader(dataset, batch_size=micro, collate_fn=collate, drop_last=True)
        return ValBatches(lambda: itertools.islice(iter(loader), n))
    samples = TrainSamples(sources, transform, text, seed=0)
    pairs = [(s, i) for s, dataset in enumerate(sources) for i in range(len(dataset))]
    items = [(s, i, draw) for draw, (s, i) in enumerate(pairs)]
    rounds = min(n, len(items) // (micro * world))
    if rounds == 0:
        raise UsageError(f"data.val: {len(items)} samples cannot fill one batch of {micro} x {world} processes")
    chunks = [items[r * micro * world + rank * micro:][:micro] for r in range(rounds)]
    return ValBatches(lambda: (collate([samples[item] for item in chunk]) for chunk in chunks))
