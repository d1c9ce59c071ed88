"""Captions, answers and conversations for the images users have: the job behind `blip2 caption` and `blip2 ask`.

  Decoding.apply(defaults)                            the user's flags on top (beam search or sampling)
  run_jobs(model, jobs, options, batch_size)          (job, texts | error) in input order; images decode in a
                                                      background thread while the model runs the batch before
  read_done / JsonlLog                                resume: records already in an --out file are skipped
  chat_prompt / Chat                                  multi-turn prompts carrying the earlier questions and answers

An image that cannot be read is a value (an error message), never an exception: the rest of the run goes on.
"""

from __future__ import annotations

import dataclasses
import json
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip2cli.config import GenerationOptions
from blip2cli.errors import InputError, UsageError
from blip2cli.jsonl import JsonlLog, read_jsonl  # noqa: F401  (JsonlLog: the commands' --out writer)

VQA_TEMPLATE = "Question: {} Short answer:"  # LAVIS's zero-shot VQA prompt (spec §6)
CHAT_TEMPLATE = "Question: {} Answer:"  # BLIP-2 Figure 4's conversation style


@dataclass
class Decoding:
    """The generation flags a user gave (None = not given). Sampling is on with `sample`, or when `top_p` or
    `temperature` is given; it replaces beam search (one beam), so --num-beams with sampling is refused."""

    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    sample: bool = False
    top_p: float | None = None
    temperature: float | None = None
    num_return: int = 1

    @property
    def sampling(self) -> bool:
        return self.sample or self.top_p is not None or self.temperature is not None

    def apply(self, defaults: GenerationOptions) -> GenerationOptions:
        """`defaults` with these flags on top; contradictions are one-line UsageErrors."""
        o = dataclasses.asdict(defaults)
        if self.sampling:
            if self.num_beams is not None and self.num_beams > 1:
                raise UsageError("--num-beams: sampling (--sample, --top-p, --temperature) uses no beams; "
                                 "drop --num-beams or the sampling flags")  # fmt: skip
            o.update(do_sample=True, num_beams=1, length_penalty=1.0)
            o["top_p"] = self.top_p if self.top_p is not None else o["top_p"]
            o["temperature"] = self.temperature if self.temperature is not None else o["temperature"]
        elif self.num_beams is not None:
            o["num_beams"] = self.num_beams
        elif self.num_return > o["num_beams"]:
            o["num_beams"] = self.num_return  # --num-captions 8 alone: search 8 beams to return 8
        if self.max_new_tokens is not None:
            o["max_new_tokens"] = self.max_new_tokens
            if self.min_new_tokens is None:  # the default minimum never exceeds a maximum the user chose
                o["min_new_tokens"] = min(o["min_new_tokens"], self.max_new_tokens)
        if self.min_new_tokens is not None:
            o["min_new_tokens"] = self.min_new_tokens
        o["num_return_sequences"] = self.num_return
        return GenerationOptions(**o)


def describe(o: GenerationOptions) -> str:
    """One line for people: what decoding runs."""
    how = f"sampling top-p {o.top_p} temperature {o.temperature}" if o.do_sample else f"{o.num_beams} beams"
    return f"{how}, {o.min_new_tokens}-{o.max_new_tokens} new tokens, length penalty {o.length_penalty:g}"


# ---------------------------------------------------------------------------------------------------------------
# The batched job


@dataclass(frozen=True)
class Job:
    image: Path  # the file to read
    prompt: str  # the text the language model continues ("" for plain captions)


def run_jobs(
    model: Any, jobs: Sequence[Job], options: GenerationOptions, batch_size: int, decode_threads: int = 2
) -> Iterator[tuple[Job, list[str] | str]]:
    """Yield (job, texts) or (job, error message) for every job, in order, `batch_size` images per forward pass.

    Images are read and resized in `decode_threads` background threads, two batches ahead of the model, so the
    model never waits on PIL (decoding and torch both release the GIL)."""
    import torch

    size, mean, std = model.cfg.vision.image_size, model.cfg.image_mean, model.cfg.image_std
    batches = [list(jobs[i : i + batch_size]) for i in range(0, len(jobs), batch_size)]
    pool = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="blip2-decode")
    pending: deque[list[Future]] = deque()
    try:
        for batch in batches[:2]:
            pending.append([pool.submit(image_pixels, job.image, size, mean, std) for job in batch])
        for i, batch in enumerate(batches):
            decoded = [future.result() for future in pending.popleft()]
            if i + 2 < len(batches):
                pending.append([pool.submit(image_pixels, job.image, size, mean, std) for job in batches[i + 2]])
            good = [(job, px) for job, px in zip(batch, decoded) if not isinstance(px, str)]
            texts: Iterator[list[str]] = iter(())
            if good:
                with torch.inference_mode():
                    pixels = torch.stack([px for _, px in good])  # (B, 3, S, S)
                    texts = iter(model.generate(pixels, [job.prompt for job, _ in good], options))
            for job, px in zip(batch, decoded):
                yield job, (px if isinstance(px, str) else next(texts))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def image_pixels(path: Path, size: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    """Normalised pixels (3, S, S), or the one-line reason the file cannot be used."""
    from blip2cli.data.images import load_image
    from blip2cli.data.transforms import eval_pixels

    try:
        return eval_pixels([load_image(path)], size, mean, std)[0]
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


# ---------------------------------------------------------------------------------------------------------------
# --out files: append, flush per record, resume


def image_key(image: str | Path) -> str:
    """Records name images as the user spelled them; a rerun matches them by absolute path."""
    from blip2cli.data.inputs import path_key  # issue 10: Path.resolve() raises on a symlink loop

    return path_key(image)


def read_done(path: Path, key: Callable[[dict[str, Any]], Hashable | None]) -> set[Hashable]:
    """Keys of the successful records in an --out file (error records are retried)."""
    return {k for record in read_jsonl(path) if "error" not in record and (k := key(record)) is not None}


# ---------------------------------------------------------------------------------------------------------------
# Questions, instructions and conversations


def question_prompt(question: str, template: str, instruct: bool = False) -> str:
    """An instruction goes to the LLM as typed; a question is cleaned (spec §2.3 `blip_question`) into the template."""
    from blip2cli.data.transforms import clean_question

    if instruct:
        return question.strip()
    return template.format(clean_question(question))


def chat_prompt(history: Sequence[tuple[str, str]], turn: str) -> str:
    """Earlier turns, then the new one (BLIP-2 Figure 4): "Question: q1 Answer: a1. Question: q2 Answer:".
    `history` holds (prompt of that turn, answer) pairs; `turn` is the new question in its template."""
    turns = [f"{prompt} {answer.rstrip('.')}." if answer else prompt for prompt, answer in history]
    return " ".join([*turns, turn])


class Chat:
    """A conversation about one image: the image is encoded once, each turn sees the earlier turns."""

    def __init__(self, model: Any, pixels: Any, template: str, options: GenerationOptions, instruct: bool = False):
        import torch

        if model.llm is None:
            raise UsageError("--chat needs a model with a language model (this one captions with the Q-Former only)")
        self.model, self.template, self.options, self.instruct = model, template, options, instruct
        with torch.inference_mode():
            self.prefix = model.llm_prefix(model.vision_embeds(pixels[None]))  # (1, Q, D), reused every turn
        self.history: list[tuple[str, str]] = []

    def ask(self, question: str) -> str:
        import torch

        turn = question_prompt(question, self.template, self.instruct)
        prompt = self._fit(self.history, turn)
        with torch.inference_mode():
            answer = self.model.llm.generate(self.prefix, [prompt], self.options)[0][0]
        self.history.append((turn, answer))
        return answer

    def _fit(self, history: list[tuple[str, str]], turn: str) -> str:
        """Drop the oldest turns until the prompt fits the language model's input."""
        llm = self.model.llm
        if llm.is_encoder_decoder:  # FrozenLLM.encoder_inputs cuts T5 prompts at max_text_len tokens (at the end)
            budget = llm.max_text_len
        else:
            context = getattr(llm.model.config, "max_position_embeddings", 2048)
            budget = context - self.prefix.shape[1] - self.options.max_new_tokens
        prompt = chat_prompt(history, turn)
        while history and len(llm.tokenizer(prompt).input_ids) > budget:
            history = history[1:]
            prompt = chat_prompt(history, turn)
        return prompt


@dataclass(frozen=True)
class BatchQuestion:
    line: int
    image: str  # as it can be opened from here: relative names are joined to the batch file's folder
    question: str


def read_batch(path: Path) -> list[BatchQuestion | dict[str, Any]]:
    """The lines of an `ask --batch` file: {"image", "question"} objects. A line that is not one becomes an error
    record ({"line", "error"}) and the other lines still run. Blank lines are skipped."""
    if path.is_dir():  # issue 10
        raise UsageError(f"--batch: {path} is a folder; give a JSONL file with one {{\"image\", \"question\"}} a line")
    if not path.is_file():
        raise UsageError(f"--batch: no such file: {path}")
    items: list[BatchQuestion | dict[str, Any]] = []
    with path.open(encoding="utf-8-sig", errors="replace") as fh:  # issue 10: -sig drops a BOM (Notepad's UTF-8)
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                items.append({"line": number, "error": f"{path}:{number}: not a JSON line"})
                continue
            image = record.get("image") if isinstance(record, dict) else None
            question = record.get("question") if isinstance(record, dict) else None
            if not isinstance(image, str) or not isinstance(question, str) or not image or not question.strip():
                expected = '{"image": "...", "question": "..."}'
                items.append({"line": number, "error": f"{path}:{number}: expected {expected}"})
                continue
            resolved = Path(image).expanduser()
            if not resolved.is_absolute():
                resolved = path.parent / resolved
            items.append(BatchQuestion(number, str(resolved), question))
    if not items:
        raise UsageError(f"--batch: {path} holds no questions")
    return items
