"""Readers for the benchmarks' official annotation and result files. Every wrong or mismatched file is one
`UsageError` line that names the file and says what was expected.

- captions: a COCO caption file (`{images, annotations}`; NoCaps val adds `domain` to each image) or a LAVIS
  Karpathy list (`[{image, caption: [...]}]`, e.g. `coco_karpathy_test.json`);
- retrieval: a LAVIS list (`coco_karpathy_test.json`, `flickr30k_test.json`) or a COCO caption file;
- VQAv2 / OK-VQA: the question file (`{questions: [...]}`) and the annotation file (`{annotations: [...]}`);
- GQA: a balanced question file (`{qid: {imageId, question, answer, ...}}`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from blip2cli.errors import UsageError

QuestionId = int | str
VqaDataset = Literal["vqav2", "okvqa", "gqa"]


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file, or explain in one line why it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file (expected {what})")
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); expected {what}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a UTF-8 text file; expected {what}") from None


def _guess_kind(data: Any) -> str:
    """A hint for the error message when a file of another kind is passed."""
    if isinstance(data, dict):
        if "questions" in data:
            return " (it looks like a VQA question file)"
        anns = data.get("annotations")
        if isinstance(anns, list) and anns and isinstance(anns[0], dict):
            if "bbox" in anns[0] or "category_id" in anns[0]:
                return " (it looks like a COCO instances file)"
            if "answers" in anns[0]:
                return " (it looks like a VQA annotation file)"
    if isinstance(data, list) and data and isinstance(data[0], dict):
        if "caption" in data[0] and "image_id" in data[0]:
            return " (it looks like a caption predictions file)"
        if "answer" in data[0] and "question_id" in data[0]:
            return " (it looks like a VQA predictions file)"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# Captions


@dataclass
class CaptionSet:
    refs: dict[int, list[str]]  # image_id -> human captions
    files: dict[int, list[str]]  # image_id -> candidate paths relative to the image root
    domains: dict[int, str] = field(default_factory=dict)  # NoCaps: image_id -> in-domain / near-domain / out-domain


def read_caption_annotations(path: Path) -> CaptionSet:
    """A COCO caption file (NoCaps val included) or a LAVIS Karpathy list."""
    data = read_json(path, "a COCO caption file ({images, annotations})")
    if isinstance(data, list):
        return _caption_set_from_list(path, data)
    if not (isinstance(data, dict) and isinstance(data.get("annotations"), list) and "images" in data):
        raise UsageError(f"{path}: not a COCO caption file (expected {{images, annotations}}){_guess_kind(data)}")
    images = {img["id"]: img for img in data["images"] if isinstance(img, dict) and "id" in img}
    refs: dict[int, list[str]] = {}
    for index, ann in enumerate(data["annotations"]):
        if not (isinstance(ann, dict) and "caption" in ann and "image_id" in ann):
            raise UsageError(
                f"{path}: not a COCO caption file (annotations need image_id and caption){_guess_kind(data)}"
            )
        for key, kinds in (("image_id", (int, str)), ("caption", (str,))):
            if isinstance(ann[key], bool) or not isinstance(ann[key], kinds):
                raise UsageError(f"{path}: annotations[{index}]: {key}: expected "
                                 f"{'an integer' if key == 'image_id' else 'a string'}, got {_describe(ann[key])}")
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    if not refs:
        raise UsageError(f"{path}: the caption file has no annotations")
    unknown = [i for i in refs if i not in images]
    if unknown and images:
        raise UsageError(
            f"{path}: {len(unknown)} annotations refer to image ids missing from `images` (e.g. {unknown[0]})"
        )
    files = {i: _coco_image_candidates(i, images.get(i, {}).get("file_name")) for i in refs}
    domains = {i: images[i]["domain"] for i in refs if "domain" in images.get(i, {})}
    return CaptionSet(refs=refs, files=files, domains=domains)


def _caption_set_from_list(path: Path, data: list[Any]) -> CaptionSet:
    items = _lavis_items(path, data)
    refs, files = {}, {}
    for index, item in enumerate(items):
        image_id = image_id_from_name(item["image"], default=index)
        refs[image_id] = _as_list(item["caption"])
        files[image_id] = [item["image"]]
    return CaptionSet(refs=refs, files=files)


def image_id_from_name(name: str, default: int) -> int:
    """COCO_val2014_000000391895.jpg -> 391895, as LAVIS derives ids from Karpathy file names."""
    match = re.search(r"(\d+)\.\w+$", name)
    return int(match.group(1)) if match else default


def _coco_image_candidates(image_id: int, file_name: str | None) -> list[str]:
    if file_name:
        return [file_name, f"val2014/{file_name}", f"val2017/{file_name}"]
    name14 = f"COCO_val2014_{image_id:012d}.jpg"
    return [name14, f"val2014/{name14}", f"{image_id:012d}.jpg", f"val2017/{image_id:012d}.jpg"]


def read_caption_predictions(path: Path) -> dict[int, str]:
    """The official caption result format: `[{"image_id": int, "caption": str}]`."""
    data = read_json(path, 'caption predictions ([{"image_id": int, "caption": str}])')
    if not isinstance(data, list) or not all(
        isinstance(r, dict) and isinstance(r.get("caption"), str) and isinstance(r.get("image_id"), int) for r in data
    ):
        raise UsageError(
            f'{path}: not a caption predictions file (expected [{{"image_id": int, "caption": str}}]){_guess_kind(data)}'
        )
    preds: dict[int, str] = {}
    for r in data:
        if r["image_id"] in preds:
            raise UsageError(f"{path}: image_id {r['image_id']} has more than one caption (one per image)")
        preds[r["image_id"]] = r["caption"]
    return preds


def check_same_ids(predicted: set[Any], annotated: set[Any], pred_path: Path, ann_path: Path, what: str) -> None:
    """Predictions must cover exactly the annotated items: anything else means mismatched files."""
    extra = predicted - annotated
    if extra:
        raise UsageError(
            f"{pred_path}: {len(extra)} predictions are for {what}s not in {ann_path} "
            f"(e.g. {min(extra, key=str)}): wrong --annotations file?"
        )
    missing = annotated - predicted
    if missing:
        raise UsageError(
            f"{pred_path}: no prediction for {len(missing)} of {len(annotated)} {what}s in {ann_path} "
            f"(e.g. {min(missing, key=str)})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Retrieval


@dataclass
class RetrievalSet:
    images: list[str]  # paths relative to the image root
    texts: list[str]  # raw captions; the caller cleans them
    img2txt: list[list[int]]  # indices of each image's captions
    txt2img: list[int]  # index of each caption's image


def read_retrieval_annotations(path: Path) -> RetrievalSet:
    """LAVIS's `coco_karpathy_test.json` / `flickr30k_test.json`, or a COCO caption file."""
    data = read_json(path, "a retrieval test file ([{image, caption: [...]}])")
    if isinstance(data, list):
        pairs = [(item["image"], _as_list(item["caption"])) for item in _lavis_items(path, data)]
    else:
        captions = read_caption_annotations(path)
        pairs = [(captions.files[i][0], captions.refs[i]) for i in captions.refs]
    out = RetrievalSet(images=[], texts=[], img2txt=[], txt2img=[])
    for image_index, (image, caps) in enumerate(pairs):
        out.images.append(image)
        out.img2txt.append(list(range(len(out.texts), len(out.texts) + len(caps))))
        out.texts.extend(caps)
        out.txt2img.extend([image_index] * len(caps))
    return out


def read_retrieval_predictions(path: Path, n_images: int, n_texts: int) -> tuple[list[list[int]], list[list[int]]]:
    """Rankings written by a model run: `{"i2t": [[text index, ...] per image], "t2i": [[image index, ...]]}`."""
    data = read_json(path, 'retrieval rankings ({"i2t": [[...]], "t2i": [[...]]})')
    if not (isinstance(data, dict) and isinstance(data.get("i2t"), list) and isinstance(data.get("t2i"), list)):
        raise UsageError(f'{path}: not a retrieval rankings file (expected {{"i2t": [[...]], "t2i": [[...]]}})')
    if len(data["i2t"]) != n_images or len(data["t2i"]) != n_texts:
        raise UsageError(
            f"{path}: rankings for {len(data['i2t'])} images / {len(data['t2i'])} texts, but the annotations have "
            f"{n_images} / {n_texts}: wrong --annotations file?"
        )
    _check_rankings(path, "i2t", data["i2t"], n_texts, "text")
    _check_rankings(path, "t2i", data["t2i"], n_images, "image")
    return data["i2t"], data["t2i"]


def _check_rankings(path: Path, field: str, rows: list[Any], n: int, what: str) -> None:
    """Each row: a non-empty list of distinct indices in 0..n-1, best first."""
    for row, ranked in enumerate(rows):
        where = f"{path}: {field}[{row}]"
        if not isinstance(ranked, list) or not ranked:
            raise UsageError(f"{where}: expected a non-empty list of {what} indices, got {_describe(ranked)}")
        for pos, index in enumerate(ranked):
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
                raise UsageError(f"{where}[{pos}]: {json.dumps(index)} is not one of the {n} {what} indices "
                                 f"(an integer from 0 to {n - 1})")
        if len(set(ranked)) != len(ranked):
            raise UsageError(f"{where}: the same {what} index appears more than once")


def _lavis_items(path: Path, data: list[Any]) -> list[dict[str, Any]]:
    ok = all(isinstance(d, dict) and isinstance(d.get("image"), str) and "caption" in d for d in data)
    if not data or not ok:
        raise UsageError(
            f"{path}: not a COCO caption file ({{images, annotations}}) nor a LAVIS list ([{{image, caption}}])"
            + _guess_kind(data)
        )
    for index, item in enumerate(data):
        caption = item["caption"]
        if not (isinstance(caption, str) or isinstance(caption, list) and caption
                and all(isinstance(c, str) for c in caption)):
            raise UsageError(f"{path}: record {index} (image {item['image']!r}): caption: expected a string or a "
                             f"non-empty list of strings, got {_describe(caption)}")
    return data


def _as_list(caption: str | list[str]) -> list[str]:
    return [caption] if isinstance(caption, str) else list(caption)


def _describe(value: Any) -> str:
    text = json.dumps(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


# ---------------------------------------------------------------------------------------------------------------
# VQA


@dataclass
class VqaItem:
    question_id: QuestionId
    image_id: int | str
    question: str
    answers: list[str]  # ten human answers (VQAv2, OK-VQA) or the single answer (GQA)
    images: list[str]  # candidate paths relative to the image root
    answer_type: str = ""
    question_type: str = ""


def read_vqa(annotations: Path | None, questions: Path | None) -> list[VqaItem]:
    """VQAv2 or OK-VQA: answers from the annotation file, question text (when given) from the question file."""
    if annotations is None:
        raise UsageError("--annotations: required for VQAv2 / OK-VQA (the file with the ten human answers)")
    data = read_json(annotations, "a VQA annotation file ({annotations: [...]})")
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not (isinstance(anns, list) and anns and all(isinstance(a, dict) and "answers" in a for a in anns)):
        raise UsageError(
            f"{annotations}: not a VQA annotation file (expected {{annotations: [{{answers}}]}}){_guess_kind(data)}"
        )
    subtype = str(data.get("data_subtype", "val2014"))
    for index, a in enumerate(anns):
        _check_vqa_annotation(annotations, index, a)
    items = {
        a["question_id"]: VqaItem(
            question_id=a["question_id"],
            image_id=a["image_id"],
            question="",
            answers=[ans["answer"] for ans in a["answers"]],
            images=_vqa_image_candidates(a["image_id"], subtype),
            answer_type=a.get("answer_type", ""),
            question_type=a.get("question_type", ""),
        )
        for a in anns
    }
    if questions is not None:
        _attach_questions(items, questions, annotations)
    return list(items.values())


def _check_vqa_annotation(path: Path, index: int, a: dict[str, Any]) -> None:
    """question_id and image_id integers, answers a non-empty list of {answer: str} (the score divides by it)."""
    for key in ("question_id", "image_id"):
        if isinstance(a.get(key), bool) or not isinstance(a.get(key), int):
            raise UsageError(f"{path}: annotations[{index}]: {key}: expected an integer, got {_describe(a.get(key))}")
    where = f"{path}: annotations[{index}] (question_id {a['question_id']}): answers"
    answers = a["answers"]
    if not isinstance(answers, list) or not answers:
        raise UsageError(f"{where}: expected a non-empty list of {{answer}} records, got {_describe(answers)}")
    for i, ans in enumerate(answers):
        if not (isinstance(ans, dict) and isinstance(ans.get("answer"), str)):
            raise UsageError(f"{where}[{i}]: expected {{\"answer\": str}}, got {_describe(ans)}")


def _attach_questions(items: dict[QuestionId, VqaItem], path: Path, annotations: Path) -> None:
    data = read_json(path, "a VQA question file ({questions: [...]})")
    qs = data.get("questions") if isinstance(data, dict) else None
    if not (isinstance(qs, list) and all(isinstance(q, dict) and "question" in q and "question_id" in q for q in qs)):
        raise UsageError(
            f"{path}: not a VQA question file (expected {{questions: [{{question_id, question}}]}}){_guess_kind(data)}"
        )
    for index, q in enumerate(qs):
        if not isinstance(q["question"], str) or not q["question"].strip():
            raise UsageError(f"{path}: questions[{index}] (question_id {q['question_id']}): question: expected a "
                             f"non-empty string, got {_describe(q['question'])}")
    by_id = {q["question_id"]: q["question"] for q in qs}
    missing = [qid for qid in items if qid not in by_id]
    if missing:
        raise UsageError(
            f"{path}: {len(missing)} questions of {annotations} are missing (e.g. {missing[0]}): mismatched files?"
        )
    for qid, item in items.items():
        item.question = by_id[qid]


def _vqa_image_candidates(image_id: int, subtype: str) -> list[str]:
    name = f"COCO_{subtype}_{image_id:012d}.jpg"
    return [f"{subtype}/{name}", name, f"{image_id:012d}.jpg", f"{subtype}/{image_id:012d}.jpg"]


def read_gqa(path: Path) -> list[VqaItem]:
    """GQA balanced test-dev questions: `{qid: {imageId, question, answer, ...}}`."""
    data = read_json(path, "a GQA question file ({qid: {imageId, question, answer}})")
    ok = (
        isinstance(data, dict)
        and data
        and all(isinstance(q, dict) and {"imageId", "question", "answer"} <= q.keys() for q in data.values())
    )
    if not ok:
        raise UsageError(
            f"{path}: not a GQA question file (expected {{qid: {{imageId, question, answer}}}}){_guess_kind(data)}"
        )
    for qid, q in data.items():
        for key in ("imageId", "question", "answer"):
            if not isinstance(q[key], str) or (key != "answer" and not q[key]):
                raise UsageError(f"{path}: question {qid}: {key}: expected a string, got {_describe(q[key])}")
    return [
        VqaItem(question_id=str(qid), image_id=q["imageId"], question=q["question"], answers=[q["answer"]],
                images=[f"{q['imageId']}.jpg", f"images/{q['imageId']}.jpg"])
        for qid, q in data.items()
    ]  # fmt: skip


def read_vqa_predictions(path: Path, dataset: VqaDataset) -> dict[QuestionId, str]:
    """`[{"question_id": int, "answer": str}]`; GQA ids are strings and its `{"questionId", "prediction"}` works too."""
    data = read_json(path, 'VQA predictions ([{"question_id": int, "answer": str}])')
    expected = f'{path}: not a VQA predictions file (expected [{{"question_id": int, "answer": str}}])'
    if not isinstance(data, list):
        raise UsageError(expected + _guess_kind(data))
    preds: dict[QuestionId, str] = {}
    for r in data:
        qid = r.get("question_id", r.get("questionId")) if isinstance(r, dict) else None
        answer = r.get("answer", r.get("prediction")) if isinstance(r, dict) else None
        if qid is None or not isinstance(answer, str):
            raise UsageError(expected + _guess_kind(data))
        if dataset == "gqa":
            qid = str(qid)
        elif not isinstance(qid, int):
            raise UsageError(f"{path}: question_id {qid!r} is not an integer (VQAv2 / OK-VQA ids are integers)")
        if qid in preds:
            raise UsageError(f"{path}: question_id {qid} has more than one answer")
        preds[qid] = answer
    return preds


# ---------------------------------------------------------------------------------------------------------------
# Images


def resolve_images(root: Path, candidates: list[list[str]]) -> list[Path]:
    """The first existing candidate for each item under `root`; one line naming the first missing image."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"--images: {root} is not a directory")
    found, missing = [], []
    for options in candidates:
        path = next((root / c for c in options if (root / c).is_file()), None)
        if path is None:
            missing.append(options[0])
        found.append(path)
    if missing:
        raise UsageError(
            f"--images: {len(missing)} of {len(candidates)} images are not under {root} (e.g. {missing[0]}); "
            "point --images at the folder that holds them"
        )
    return found
