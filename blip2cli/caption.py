"""Captions for the images users have: the job behind `blip2 caption` (and the batched runner `blip2 ask` shares).

  caption_images(model, paths, ...)                   one record per image, written to a resumable log as it comes
  run_jobs(model, jobs, options, batch_size)          (job, texts | error) in input order; images decode in
                                                      background threads while the model runs the batch before
  open_log(out, settings) / pending(paths, log)       resume: images already captioned in an --out file are skipped

An image that cannot be read is a value (an error message), never an exception: the rest of the run goes on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from blip2cli.config import GenerationOptions
from blip2cli.data import images
from blip2cli.data.prefetch import prefetch
from blip2cli.data.transforms import eval_pixel
from blip2cli.decoding import Decoding, caption_defaults
from blip2cli.errors import InputError, UsageError
from blip2cli.jsonl import ResumeLog
from blip2cli.model.blip2 import Blip2


@dataclass(frozen=True)
class Job:
    image: str  # a file, "-" (standard input) or an http(s) URL (images.load_source)
    prompt: str  # the text the language model continues ("" for plain captions)


def run_jobs(
    model: Blip2, jobs: Sequence[Job], options: GenerationOptions, batch_size: int, decode_threads: int = 2
) -> Iterator[tuple[Job, list[str] | str]]:
    """Yield (job, texts) or (job, error message) for every job, in order, `batch_size` images per forward pass;
    images are read two batches ahead of the model (data.prefetch)."""
    size, mean, std = model.cfg.vision.image_size, model.cfg.image_mean, model.cfg.image_std
    batches = [list(jobs[i : i + batch_size]) for i in range(0, len(jobs), batch_size)]
    ahead = prefetch(jobs, lambda job: image_pixels(job.image, size, mean, std), decode_threads, 2 * batch_size)
    for batch in batches:
        decoded = [next(ahead) for _ in batch]
        good = [(job, px) for job, px in zip(batch, decoded) if not isinstance(px, str)]
        texts: Iterator[list[str]] = iter(())
        if good:
            with torch.inference_mode():
                pixels = torch.stack([px for _, px in good])  # (B, 3, S, S)
                texts = iter(model.generate(pixels, [job.prompt for job, _ in good], options))
        for job, px in zip(batch, decoded):
            yield job, (px if isinstance(px, str) else next(texts))


def image_pixels(path: str | Path, size: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    """Normalised pixels (3, S, S), or the one-line reason the file (or "-", or URL) cannot be used."""
    try:
        return eval_pixel(images.load_source(path), size, mean, std)
    except InputError as exc:
        return str(exc)


def caption_record(image: str, texts: list[str] | str, prompt: str = "", keep_prompt: bool = False) -> dict[str, Any]:
    """{"image", "caption"} (+ "captions" when several were asked for) or {"image", "error"}."""
    if isinstance(texts, str):
        return {"image": image, "error": texts}
    if keep_prompt and prompt:
        texts = [f"{prompt} {t}".strip() for t in texts]
    record: dict[str, Any] = {"image": image, "caption": texts[0]}
    if len(texts) > 1:
        record["captions"] = texts
    return record


def caption_prompt(model: Blip2, prompt: str | None) -> str:
    """The prompt a caption continues: the given one, else a fine-tuned run's own; none for Q-Former captions."""
    return "" if model.llm is None else model.cfg.llm.prompt if prompt is None else prompt


def caption_options(model: Blip2, decoding: Decoding, prompt: str | None) -> GenerationOptions:
    """The paper's caption decoding for this model and prompt, with the user's flags on top."""
    return decoding.apply(caption_defaults(model, caption_prompt(model, prompt)))


def caption_images(
    model: Blip2,
    paths: Sequence[str | Path],
    *,
    decoding: Decoding,
    prompt: str | None = None,
    keep_prompt: bool = False,
    batch_size: int = 8,
    log: ResumeLog | None = None,
) -> Iterator[dict[str, Any]]:
    """Caption `paths`, yielding one record per image in order, each appended to `log` as it comes."""
    text, options = caption_prompt(model, prompt), caption_options(model, decoding, prompt)
    if model.llm is None and (model.cfg.llm.prompt if prompt is None else prompt):
        warnings.warn("--prompt is ignored: this model has no language model and captions with the Q-Former",
                      stacklevel=2)  # fmt: skip
    if log is not None:
        log.open()
    for job, texts in run_jobs(model, [Job(str(p), text) for p in paths], options, batch_size):
        record = caption_record(str(job.image), texts, text, keep_prompt)
        if log is not None:
            log.write(record)
        yield record


# ---------------------------------------------------------------------------------------------------------------
# --out files: append, flush per record, resume


def image_key(image: str | Path) -> str:
    """Records name images as the user spelled them; a rerun matches files by absolute path, URLs as spelled."""
    from blip2cli.data.inputs import source_key  # issue 10: Path.resolve() raises on a symlink loop

    return source_key(image)


def open_log(out: Path, model: str, decoding: Decoding, **settings: Any) -> ResumeLog:
    """The resumable `caption --out` log (records keyed by image); a log written with other settings is refused."""
    if out.is_dir():
        raise UsageError(f"--out: {out} is a folder; give a file such as {out / 'captions.jsonl'}")
    key = lambda r: image_key(r["image"]) if "image" in r else None  # noqa: E731
    return ResumeLog(out, key, {"model": model, "decoding": asdict(decoding), **settings})


def pending(paths: Sequence[str], log: ResumeLog | None) -> list[str]:
    """The images without a caption in `log` yet (failed ones are retried; "-", standard input, is new each run)."""
    if log is None:
        return list(paths)
    return [p for p in paths if str(p) == images.STDIN or image_key(p) not in log.done]
