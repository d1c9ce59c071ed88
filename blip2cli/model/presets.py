"""The paper's decoding settings per use and model (spec §6).

LAVIS's min_length counts the prompt tokens (BOS included) for decoder-only LLMs and the decoder start token for
Flan-T5 and the Q-Former's [DEC]; we pass min_new_tokens, so the count is converted here.
"""

from __future__ import annotations

from typing import Any

from blip2cli.config import GenerationOptions


def _min_new(model: Any, prompt: str, min_length: int) -> int:
    llm = model.llm
    if llm is None or llm.is_encoder_decoder:  # the Q-Former's [DEC] / T5's decoder start token
        return max(min_length - 1, 0)
    return max(min_length - len(llm.tokenizer(prompt).input_ids), 0)


def caption_options(model: Any, prompt: str) -> GenerationOptions:
    """The paper's caption decoding: 5 beams, 30 new tokens, min_length 8 with the prompt counted (OPT + "": 7
    new, OPT + "a photo of": 4 new, Flan-T5: 7 new). Stage-1 models caption with the Q-Former as LAVIS does:
    3 beams, max_length 30 and min_length 10, both counting [DEC] (29 and 9 new)."""
    if model.llm is None:
        return GenerationOptions(num_beams=3, max_new_tokens=29, min_new_tokens=9)
    return GenerationOptions(num_beams=5, max_new_tokens=30, min_new_tokens=_min_new(model, prompt, 8))


def vqa_options(model: Any) -> GenerationOptions:
    """Zero-shot VQA: 5 beams, 10 new tokens, min_length 1 (always met by the prompt: 0 new), length penalty -1 for
    Flan-T5 and 0 for decoder-only LLMs. Spec §6 "to verify": OPT's 0 is LAVIS's code; the paper may use -1."""
    t5 = model.llm is not None and model.llm.is_encoder_decoder
    return GenerationOptions(num_beams=5, max_new_tokens=10, min_new_tokens=0, length_penalty=-1.0 if t5 else 0.0)


def instruct_options(model: Any) -> GenerationOptions:
    """Free instructions have no upstream protocol (spec §6): LAVIS's generate() defaults, 5 beams, 30 new tokens."""
    return GenerationOptions(num_beams=5, max_new_tokens=30, min_new_tokens=0)
