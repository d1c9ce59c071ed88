"""VQA accuracy as the official VQAv2 evaluation computes it, a LAVIS-compatible mode, OK-VQA and GQA.

The official rules (ecosystem §4), quirks included:
1. newlines/tabs become spaces, then strip;
2. answers are normalised only when the ten human answers are not all identical, so "Yes" against ten "yes"
   scores 0 and so does "two" against ten "2";
3. punctuation: each mark in `PUNCTUATION` is deleted when the text has it next to a space or holds a
   digit-comma-digit anywhere, else replaced by a space; then periods not followed by a digit are removed
   (the intended "not preceded by a digit" guard never applies upstream, and at most 32 are removed);
4. lowercase, number words to digits, drop articles, restore contraction apostrophes;
5. accuracy = mean over the ten leave-one-out subsets of min(1, matches among the other nine / 3).

LAVIS (`--normalize lavis`) always normalises the prediction, and the human answers only by punctuation and
only when they disagree.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from blip2cli.data.transforms import clean_question
from blip2cli.decoding import VQA_TEMPLATE, Decoding, vqa_defaults
from blip2cli.errors import UsageError
from blip2cli.eval import check_inputs, check_weights, load_model, resume_log, write_outputs
from blip2cli.eval import datasets as ds
from blip2cli.jsonl import run_resumable

if TYPE_CHECKING:
    from blip2cli.config import GenerationOptions
    from blip2cli.model.blip2 import Blip2

Normalize = Literal["official", "lavis"]
QuestionId = int | str

PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'  # apostrophes, colons, # $ % & * survive
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # upstream passes re.UNICODE (= 32) where the count goes

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}

# The official table of contractions written without apostrophes, odd entries kept: the capitalised keys never
# match lower-cased text, "let's" and "she's" map to themselves, and "somebody'd" loses its apostrophe.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip


def clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Rule 3: delete or space out punctuation, then drop periods that are not decimal points."""
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        joined = delete or f"{mark} " in text or f" {mark}" in text  # tested on the original text
        out = out.replace(mark, "" if joined else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
    """Rule 4: lowercase, number words to digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """Both normalisation steps; what a well-formed prediction should look like before it is written."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str], mode: Normalize = "official") -> float:
    """Accuracy of one prediction against the human answers, leave-one-out (rule 5)."""
    answers = [clean_whitespace(a) for a in answers]
    pred = clean_whitespace(prediction)
    disagree = len(set(answers)) > 1
    if mode == "official" and disagree:
        answers = [process_digit_article(process_punctuation(a)) for a in answers]
        pred = process_digit_article(process_punctuation(pred))
    elif mode == "lavis":
        pred = process_digit_article(process_punctuation(pred))
        if disagree:
            answers = [process_punctuation(a) for a in answers]
    total = len(answers)
    matches = sum(a == pred for a in answers)
    # Holding out a matching answer leaves matches-1 among the others, holding out any other leaves matches.
    # sum of min(3, count) / (3 * total) is the mean of min(1, count/3), computed exactly.
    held_out = matches * min(3, matches - 1) + (total - matches) * min(3, matches)
    return held_out / (3 * total)


@dataclass
class VqaScores:
    """Percentages rounded to 2 decimals, as the official script reports them."""

    n: int
    accuracy: float
    answer_types: dict[str, float] = field(default_factory=dict)  # yes/no, number, other
    question_types: dict[str, float] = field(default_factory=dict)  # "what color is the", ...

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, **self.answer_types}


def score_vqa(
    answers: Mapping[QuestionId, Sequence[str]],
    predictions: Mapping[QuestionId, str],
    answer_types: Mapping[QuestionId, str] | None = None,
    question_types: Mapping[QuestionId, str] | None = None,
    mode: Normalize = "official",
) -> VqaScores:
    """VQAv2 / OK-VQA accuracy over the questions in `answers` (each must have a prediction)."""
    per_question = {qid: vqa_accuracy(predictions[qid], gts, mode) for qid, gts in answers.items()}
    return VqaScores(
        n=len(per_question),
        accuracy=_percent(per_question.values()),
        answer_types=dict(sorted(_grouped(per_question, answer_types or {}).items(), key=_answer_type_order)),
        question_types=_grouped(per_question, question_types or {}),
    )


def score_gqa(answers: Mapping[QuestionId, str], predictions: Mapping[QuestionId, str]) -> VqaScores:
    """GQA: exact match of the normalised prediction against the single (unnormalised) answer."""
    hits = [float(normalize_answer(predictions[qid]) == gt) for qid, gt in answers.items()]
    return VqaScores(n=len(hits), accuracy=_percent(hits))


def _percent(values: Iterable[float]) -> float:
    values = list(values)
    return round(100 * sum(values) / len(values), 2) if values else 0.0


def _answer_type_order(item: tuple[str, float]) -> tuple[int, str]:
    order = ("yes/no", "number", "other")  # the official report's order
    return (order.index(item[0]) if item[0] in order else len(order), item[0])


def _grouped(per_question: Mapping[QuestionId, float], groups: Mapping[QuestionId, str]) -> dict[str, float]:
    buckets: dict[str, list[float]] = defaultdict(list)
    for qid, acc in per_question.items():
        if qid in groups:
            buckets[groups[qid]].append(acc)
    return {name: _percent(accs) for name, accs in sorted(buckets.items())}


# ---------------------------------------------------------------------------------------------------------------
# OK-VQA lemmatisation. LAVIS lemmatises NOUN/VERB tokens of the prediction with spaCy's en_core_web_sm, which is
# not on PyPI. `lemminflect` (optional extra `okvqa`) ships its data in the wheel; without a tagger we take a word's
# verb lemma for -ing forms and its noun lemma otherwise: an approximation of spaCy, not a copy.


def lemmatizer_available() -> bool:
    try:
        import lemminflect  # noqa: F401
    except ImportError:
        return False
    return True


def lemmatize(answer: str) -> str:
    """Lemmatise the alphabetic words of an answer ("two dogs" -> "two dog", "skiing" -> "ski")."""
    import lemminflect

    def one(word: str) -> str:
        if not word.isalpha():
            return word
        upos = "VERB" if word.endswith("ing") else "NOUN"
        lemmas = lemminflect.getLemma(word, upos=upos)
        return lemmas[0] if lemmas else word

    return " ".join(one(w) for w in answer.split())


# ---------------------------------------------------------------------------------------------------------------
# Running a model


def answer_questions(
    model: Blip2,
    questions: Sequence[tuple[QuestionId, Path, str]],
    pixels_fn: Callable[[Sequence[Path]], Any],
    options: GenerationOptions,
    batch_size: int,
    log: Path | None = None,
    lemmatize_answers: bool = False,
) -> dict[QuestionId, str]:
    """Answer (question_id, image, prompt) triples with `model.generate`; resumable through `log`.

    Answers are normalised (and, for OK-VQA, lemmatised first) before they are written, so the official and the
    LAVIS rules agree on them and the result file can be rescored anywhere.
    """
    import torch

    def predict(batch: list[tuple[QuestionId, Path, str]]) -> list[dict[str, Any]]:
        unique = list(dict.fromkeys(image for _, image, _ in batch))  # VQAv2 asks ~5 questions per image
        rows = [unique.index(image) for _, image, _ in batch]
        pixels = pixels_fn(unique)[rows].to(model.device)
        with torch.inference_mode():
            texts = model.generate(pixels, [prompt for _, _, prompt in batch], options)
        records = []
        for (qid, _, _), outs in zip(batch, texts):
            raw = outs[0].strip()
            answer = normalize_answer(lemmatize(raw) if lemmatize_answers else raw)
            records.append({"question_id": qid, "answer": answer, "raw_answer": raw})
        return records

    done = run_resumable(list(questions), lambda q: q[0], "question_id", predict, batch_size, log, "answering",
                         unit="questions", done_verb="answered")
    return {qid: done[qid]["answer"] for qid, _, _ in questions}


def eval_vqa(
    *,
    annotations: Path | None = None,
    questions: Path | None = None,
    predictions: Path | None = None,
    model: str | None = None,
    images: Path | None = None,
    dataset: Literal["vqav2", "okvqa", "gqa"] = "vqav2",
    normalize: Normalize = "official",
    lemmatize_predictions: bool = False,
    template: str = VQA_TEMPLATE,
    decoding: Decoding = Decoding(),
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    batch_size: int = 16,
    out: Path | None = None,
    revision: str | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Score `predictions`, or answer the benchmark's questions with `model` (the paper's zero-shot VQA decoding
    with `decoding` on top; resumable in `out`; a hub id at `revision`, downloaded into `cache_dir`); writes
    `out`/scores.json and predictions.json; returns the record.
    OK-VQA answers are lemmatised for model runs always, for a predictions file with `lemmatize_predictions`."""
    check_inputs(predictions, model, images)
    if dataset == "gqa":
        if (questions or annotations) is None:
            raise UsageError("--questions: required for GQA (testdev_balanced_questions.json)")
        items = ds.read_gqa(questions or annotations)
    else:
        items = ds.read_vqa(annotations, questions)
    warnings = []
    lemma = dataset == "okvqa" and (lemmatize_predictions or predictions is None)
    if lemma and not lemmatizer_available():
        lemma = False
        warnings.append("OK-VQA answers scored unlemmatised (LAVIS lemmatises them with spaCy): "
                        "pip install 'blip2cli[okvqa]' for the lemminflect approximation")  # fmt: skip
    if predictions is not None:
        preds = ds.read_vqa_predictions(predictions, dataset)
        ds.check_same_ids(set(preds), {q.question_id for q in items}, predictions, annotations or questions, "question")
        if lemma:
            preds = {qid: lemmatize(a) for qid, a in preds.items()}
    else:
        if dataset != "gqa" and questions is None:
            raise UsageError("--questions: required with --model (the question file that goes with --annotations)")
        paths = ds.resolve_images(images, [q.images for q in items])
        check_weights(out, model, quantize)  # before the (long) load
        net, pixels = load_model(model, device, dtype, "answer", "eval vqa", quantize, revision, cache_dir)
        options = decoding.apply(vqa_defaults(net))
        log = resume_log(out, {"task": f"vqa-{dataset}", "model": model, "revision": revision, "quantize": quantize,
                               "questions": str(questions or annotations), "template": template, "lemmatize": lemma,
                               "options": vars(options)})  # fmt: skip
        jobs = [(q.question_id, p, template.format(clean_question(q.question))) for q, p in zip(items, paths)]
        preds = answer_questions(net, jobs, pixels, options, batch_size, log, lemmatize_answers=lemma)
    if dataset == "gqa":
        scores = score_gqa({q.question_id: q.answers[0] for q in items}, preds)
    else:
        scores = score_vqa(
            {q.question_id: q.answers for q in items}, preds,
            {q.question_id: q.answer_type for q in items}, {q.question_id: q.question_type for q in items}, normalize,
        )  # fmt: skip
    record: dict[str, Any] = {"task": "vqa", "n": scores.n, "metrics": scores.metrics()}
    if scores.question_types:
        record["question_types"] = scores.question_types
    if warnings:
        record["warnings"] = warnings
    if out is not None:
        rows = None
        if predictions is None:
            id_key, answer_key = ("questionId", "prediction") if dataset == "gqa" else ("question_id", "answer")
            rows = [{id_key: q.question_id, answer_key: preds[q.question_id]} for q in items]
        write_outputs(out, record, rows)
    return record
