"""What a job needs from a loaded model, checked right after loading and before any work: a captioning
checkpoint cannot build a retrieval index, a stage-1 model cannot answer questions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from blip2cli.errors import UsageError

if TYPE_CHECKING:  # blip2 imports torch; the check itself only reads attributes
    from blip2cli.model.blip2 import Blip2

Need = Literal["caption", "answer", "retrieval"]

LLM_IDS = "Salesforce/blip2-opt-2.7b, blip2-opt-6.7b, blip2-flan-t5-xl or blip2-flan-t5-xxl"
RETRIEVAL_IDS = "Salesforce/blip2-itm-vit-g, or a stage-1 run or LAVIS stage-1 checkpoint"

WHAT = {  # need: (the kind of model, what this one lacks, the official ids that provide it)
    "caption": ("a captioning model", "no language model and no Q-Former text head", LLM_IDS),
    "answer": ("a model with a language model", "no language model", LLM_IDS),
    "retrieval": ("an image-text matching model", "no ITC/ITM heads or no Q-Former tokenizer", RETRIEVAL_IDS),
}


def has(model: Blip2, need: Need) -> bool:
    """Whether `model` (a Blip2) can do `need`."""
    llm = getattr(model, "llm", None) is not None
    tokenizer = getattr(model, "tokenizer", None) is not None
    if need == "answer":
        return llm
    if need == "caption":
        return llm or (tokenizer and getattr(getattr(model, "qformer", None), "cls", None) is not None)
    heads = ("vision_proj", "text_proj", "itm_head")
    return tokenizer and all(getattr(model, h, None) is not None for h in heads)


def require(model: Blip2, need: Need, job: str, name: str, flag: str = "--model") -> None:
    """One line (exit 2) naming the kind of model `job` needs and the official ids that provide it."""
    if not has(model, need):
        kind, lacks, ids = WHAT[need]
        raise UsageError(f"{flag} {name}: {job} needs {kind} (this one has {lacks}), e.g. {ids}")
