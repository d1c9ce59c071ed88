"""Answers about images: the job behind `blip2 ask` (one question, a `--batch` file of them, or a `Chat`).

  answer(model, items, ...)                        one record per (image, question), in order, to a resumable log
  Chat(model, pixels, template, options)           a conversation: each turn sees the earlier questions and answers
  read_batch(path)                                 the lines of an `ask --batch` file
  question_prompt / chat_prompt                    the text the language model continues
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from blip2cli.caption import Job, image_key, run_jobs
from blip2cli.config import GenerationOptions
from blip2cli.data.fetch import is_url, url_scheme
from blip2cli.data.images import STDIN
from blip2cli.data.inputs import check_stdin
from blip2cli.data.transforms import clean_question
from blip2cli.decoding import CHAT_TEMPLATE, VQA_TEMPLATE, Decoding, check_template, instruct_defaults, vqa_defaults
from blip2cli.errors import UsageError
from blip2cli.jsonl import ResumeLog
from blip2cli.model.blip2 import Blip2


def question_prompt(question: str, template: str, instruct: bool = False) -> str:
    """An instruction goes to the LLM as typed; a question is cleaned as LAVIS's `blip_question` processor cleans
    it (lower case, punctuation dropped) and put in the template."""
    if instruct:
        return question.strip()
    return template.format(clean_question(question))


@dataclass(frozen=True)
class BatchQuestion:
    line: int
    image: str  # as it can be opened from here: relative names are joined to the batch file's folder
    question: str


Item = BatchQuestion | dict[str, Any]  # a question, or the error record of an unusable --batch line


def check_request(*, image: str | None, question: str | None, template: str | None, instruct: bool, chat: bool,
                  batch: Path | None, out: Path | None) -> str:  # fmt: skip
    """The question template to use (`--chat` defaults to the conversation one); a one-line UsageError for
    missing or contradictory arguments, before anything is loaded."""
    if instruct and template is not None:
        raise UsageError("--template: not used with --instruct (the text is sent as typed)")
    template = check_template(template if template is not None else (CHAT_TEMPLATE if chat else VQA_TEMPLATE))
    if batch is not None and (image is not None or chat):
        raise UsageError("--batch: give either IMAGE QUESTION, --chat or --batch FILE, not several")
    if batch is None:
        if image is None:
            raise UsageError("IMAGE: missing (blip2 ask IMAGE QUESTION, or --batch FILE.jsonl)")
        if question is None and not chat:
            raise UsageError("QUESTION: missing (or --chat to ask from standard input)")
        if chat and image == STDIN:
            raise UsageError("--chat reads its questions from standard input, so the image cannot come from it too: "
                             "give a file or URL")
        if image == STDIN:
            check_stdin()
        elif is_url(image):
            pass
        elif url_scheme(image) is not None and not Path(image).exists():
            raise UsageError(f"unsupported URL scheme {url_scheme(image)}://: only http:// and https:// are fetched: "
                             f"{image}")
        elif not Path(image).exists():
            raise UsageError(f"no such file: {image}")
        elif Path(image).is_dir():
            raise UsageError(f"{image} is a folder: blip2 ask takes one image (or --batch FILE.jsonl)")
    if out is not None and out.is_dir():
        raise UsageError(f"--out: {out} is a folder; give a file such as {out / 'answers.jsonl'}")
    return template


def answer_options(model: Blip2, decoding: Decoding, instruct: bool = False) -> GenerationOptions:
    """The paper's zero-shot VQA decoding (or LAVIS's defaults for free instructions), the user's flags on top."""
    return decoding.apply(instruct_defaults(model) if instruct else vqa_defaults(model))


def answer(
    model: Blip2,
    items: Sequence[Item],
    *,
    decoding: Decoding,
    template: str = VQA_TEMPLATE,
    instruct: bool = False,
    batch_size: int = 8,
    log: ResumeLog | None = None,
) -> Iterator[dict[str, Any]]:
    """Answer (image, question) items in batches, yielding one record per item in file order (unusable lines where
    they stand, as their error records), each appended to `log` as it comes."""
    options = answer_options(model, decoding, instruct)
    asked = [i for i in items if isinstance(i, BatchQuestion)]
    jobs = [Job(i.image, question_prompt(i.question, template, instruct)) for i in asked]
    results = run_jobs(model, jobs, options, batch_size)
    if log is not None:
        log.open()
    for item in items:
        if isinstance(item, BatchQuestion):
            texts = next(results)[1]
            record: dict[str, Any] = {"image": item.image, "question": item.question}
            record.update({"error": texts} if isinstance(texts, str) else {"answer": texts[0]})
        else:
            record = item
        if log is not None:
            log.write(record)
        yield record


def record_key(record: dict[str, Any]) -> tuple[str, str] | tuple[str, int] | None:
    """Answers are matched by (image, question); an unusable line by its line number."""
    if "question" in record and "image" in record:
        return image_key(record["image"]), record["question"]
    return ("line", record["line"]) if "line" in record else None


def open_log(out: Path, model: str, decoding: Decoding, **settings: Any) -> ResumeLog:
    """The resumable `ask --batch --out` log; a log written with other settings is refused."""
    if out.is_dir():
        raise UsageError(f"--out: {out} is a folder; give a file such as {out / 'answers.jsonl'}")
    return ResumeLog(out, record_key, {"model": model, "decoding": asdict(decoding), **settings})


def pending(items: Sequence[Item], log: ResumeLog | None) -> list[Item]:
    """The items without an answer in `log` yet (unusable lines are always reported again)."""
    if log is None:
        return list(items)
    return [i for i in items if isinstance(i, dict) or record_key(asdict(i)) not in log.done]


# ---------------------------------------------------------------------------------------------------------------
# Conversations


def chat_prompt(history: Sequence[tuple[str, str]], turn: str) -> str:
    """Earlier turns, then the new one (BLIP-2 Figure 4): "Question: q1 Answer: a1. Question: q2 Answer:".
    `history` holds (prompt of that turn, answer) pairs; `turn` is the new question in its template."""
    turns = [f"{prompt} {answer.rstrip('.')}." if answer else prompt for prompt, answer in history]
    return " ".join([*turns, turn])


class Chat:
    """A conversation about one image: the image is encoded once, each turn sees the earlier turns."""

    def __init__(self, model: Blip2, pixels: Tensor, template: str, options: GenerationOptions,
                 instruct: bool = False) -> None:  # fmt: skip
        if model.llm is None:
            raise UsageError("--chat needs a model with a language model (this one captions with the Q-Former only)")
        self.model, self.template, self.options, self.instruct = model, template, options, instruct
        with torch.inference_mode():
            self.prefix = model.llm_prefix(model.vision_embeds(pixels[None]))  # (1, Q, D), reused every turn
        self.history: list[tuple[str, str]] = []

    def ask(self, question: str) -> str:
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


# ---------------------------------------------------------------------------------------------------------------
# --batch files


def read_batch(path: Path) -> list[Item]:
    """The lines of an `ask --batch` file: {"image", "question"} objects. A line that is not one becomes an error
    record ({"line", "error"}) and the other lines still run. Blank lines are skipped; a UTF-8 BOM is dropped."""
    if path.is_dir():
        raise UsageError(f"--batch: {path} is a folder; give a JSONL file with one {{\"image\", \"question\"}} a line")
    if not path.is_file():
        raise UsageError(f"--batch: no such file: {path}")
    items: list[Item] = []
    with path.open(encoding="utf-8-sig", errors="replace") as fh:  # -sig: Notepad's UTF-8 starts with a BOM
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
            if is_url(image):
                items.append(BatchQuestion(number, image, question))
                continue
            resolved = Path(image).expanduser()
            if not resolved.is_absolute():
                resolved = path.parent / resolved
            items.append(BatchQuestion(number, str(resolved), question))
    if not items:
        raise UsageError(f"--batch: {path} holds no questions")
    return items
