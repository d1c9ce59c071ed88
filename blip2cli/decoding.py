"""How captions and answers are decoded: the user's flags (`Decoding`), the paper's settings per use and model,
and the prompt templates. Every command that generates text, `eval` included, builds its options here.

  Decoding(...).apply(caption_defaults(model, prompt))   the paper's settings with the user's flags on top
  VQA_TEMPLATE, CHAT_TEMPLATE, CAPTION_PROMPT            the prompts BLIP-2 was evaluated with
  check_template(template)                               a one-line UsageError for a template without one {}

LAVIS's `min_length` counts the prompt tokens (BOS included) for decoder-only LLMs and the decoder start token for
Flan-T5 and the Q-Former's [DEC]; `GenerationOptions` counts new tokens only, so the count is converted here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blip2cli.config import GenerationOptions
from blip2cli.errors import UsageError

if TYPE_CHECKING:
    from blip2cli.model.blip2 import Blip2

VQA_TEMPLATE = "Question: {} Short answer:"  # LAVIS blip2 VQA task (`prompt` in its vqa configs), paper §4.1
CHAT_TEMPLATE = "Question: {} Answer:"  # BLIP-2 paper, Figure 4's conversation style
CAPTION_PROMPT = "a photo of"  # the paper's COCO fine-tuning prompt (LAVIS caption_coco configs, `prompt`)


@dataclass(frozen=True)
class Decoding:
    """The generation flags a user gave (None = not given). Sampling is on with `sample`, or when `top_p` or
    `temperature` is given; it replaces beam search (one beam), so num_beams > 1 with sampling is refused."""

    num_beams: int | None = None
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    sample: bool = False
    top_p: float | None = None
    temperature: float | None = None
    num_captions: int = 1

    @property
    def sampling(self) -> bool:
        return self.sample or self.top_p is not None or self.temperature is not None

    def check(self) -> Decoding:
        """Refuse contradictory flags now, before a model is loaded."""
        self.apply(GenerationOptions())
        return self

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
        elif self.num_captions > o["num_beams"]:
            o["num_beams"] = self.num_captions  # --num-captions 8 alone: search 8 beams to return 8
        if self.max_new_tokens is not None:
            o["max_new_tokens"] = self.max_new_tokens
            if self.min_new_tokens is None:  # the default minimum never exceeds a maximum the user chose
                o["min_new_tokens"] = min(o["min_new_tokens"], self.max_new_tokens)
        if self.min_new_tokens is not None:
            o["min_new_tokens"] = self.min_new_tokens
        o["num_return_sequences"] = self.num_captions
        return GenerationOptions(**o)


def describe(o: GenerationOptions) -> str:
    """One line for people: what decoding runs."""
    how = f"sampling top-p {o.top_p} temperature {o.temperature}" if o.do_sample else f"{o.num_beams} beams"
    return f"{how}, {o.min_new_tokens}-{o.max_new_tokens} new tokens, length penalty {o.length_penalty:g}"


def check_template(template: str) -> str:
    """A question template holds exactly one {} (and no other braces)."""
    try:
        template.format("?")
    except (IndexError, KeyError, ValueError):
        raise UsageError(f"--template: {template!r} must hold one {{}} for the question (and no other braces)") from None
    if "{}" not in template:
        raise UsageError(f"--template: {template!r} has no {{}} for the question")
    return template


# ---------------------------------------------------------------------------------------------------------------
# The paper's settings (BLIP-2 paper §4; LAVIS's caption/VQA task configs and Blip2OPT/Blip2T5 `generate` defaults)


def _min_new(model: Blip2, prompt: str, min_length: int) -> int:
    llm = model.llm
    if llm is None or llm.is_encoder_decoder:  # the Q-Former's [DEC] / T5's decoder start token
        return max(min_length - 1, 0)
    return max(min_length - len(llm.tokenizer(prompt).input_ids), 0)


def caption_defaults(model: Blip2, prompt: str) -> GenerationOptions:
    """The paper's caption decoding: 5 beams, 30 new tokens, min_length 8 with the prompt counted (OPT + "": 7
    new, OPT + "a photo of": 4 new, Flan-T5: 7 new). Stage-1 models caption with the Q-Former as LAVIS's
    `Blip2Qformer.generate` does: 3 beams, max_length 30 and min_length 10, both counting [DEC] (29 and 9 new)."""
    if model.llm is None:
        return GenerationOptions(num_beams=3, max_new_tokens=29, min_new_tokens=9)
    return GenerationOptions(num_beams=5, max_new_tokens=30, min_new_tokens=_min_new(model, prompt, 8))


def vqa_defaults(model: Blip2) -> GenerationOptions:
    """Zero-shot VQA as LAVIS's `predict_answers` runs it: 5 beams, 10 new tokens, min_length 1 (always met by the
    prompt: 0 new), length penalty -1 for Flan-T5 and 0 for decoder-only LLMs (LAVIS's Blip2OPT default; the paper
    does not state OPT's)."""
    t5 = model.llm is not None and model.llm.is_encoder_decoder
    return GenerationOptions(num_beams=5, max_new_tokens=10, min_new_tokens=0, length_penalty=-1.0 if t5 else 0.0)


def instruct_defaults(model: Blip2) -> GenerationOptions:
    """Free instructions have no benchmark protocol: LAVIS's `generate()` defaults, 5 beams, 30 new tokens."""
    return GenerationOptions(num_beams=5, max_new_tokens=30, min_new_tokens=0)
