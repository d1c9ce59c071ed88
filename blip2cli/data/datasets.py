"""Training and evaluation data: annotation files, caption folders and WebDataset shards as torch datasets.

Adding a dataset is a recipe entry, not code: a `config.DataSource` names the format (`kind`), and `build_dataset`
turns it into a torch dataset with an explicit `if` per kind. Every sample is a dict

    {"image": PIL RGB image, "text": cleaned caption or question, "image_id": int, "path": str}

(+ "answers" for VQA lines). Transforms and tokenisation are the caller's (a collate function runs in the
DataLoader workers). A bad image never stops a run: it is skipped with a `SkippedSampleWarning`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from blip2cli.config import DataSource
from blip2cli.data.images import load_image, load_image_bytes
from blip2cli.data.inputs import images_in_folder
from blip2cli.data.transforms import clean_caption, clean_question
from blip2cli.errors import InputError, UsageError

Sample = dict[str, Any]

# How many following items a map-style dataset tries before deciding the data itself is broken.
_MAX_CONSECUTIVE_BAD = 100


class SkippedSampleWarning(UserWarning):
    """A sample was left out (unreadable image, missing caption); training goes on without it."""


def build_dataset(spec: DataSource) -> Dataset | IterableDataset:
    """Map-style dataset for annotation files and folders, an IterableDataset stream for shards."""
    if spec.kind == "webdataset":
        return webdataset_stream(shard_urls(spec.path), spec.resampled, spec.shuffle, spec.max_words)
    if spec.kind == "coco":
        records = read_coco(Path(spec.path), _image_root(spec))
    elif spec.kind == "lavis_json":
        records = read_lavis_json(Path(spec.path), _image_root(spec))
    elif spec.kind == "jsonl":
        records = read_jsonl(Path(spec.path), _image_root(spec))
    elif spec.kind == "folder":
        records = read_folder(Path(spec.path))
    else:
        raise UsageError(f"kind: unknown dataset kind '{spec.kind}'")
    return ImageTextDataset(records, spec.max_words)


def _image_root(spec: DataSource) -> Path:
    return Path(spec.image_root) if spec.image_root else Path(spec.path).parent


# ---------------------------------------------------------------------------------------------------------------
# Map-style: a list of records read once, images decoded per access


@dataclass(frozen=True)
class Record:
    """One annotation: an image and its raw texts (one caption is sampled per access when there are several)."""

    image: Path
    image_id: int
    captions: tuple[str, ...] = ()
    question: str | None = None
    answers: tuple[str, ...] = ()


class ImageTextDataset(Dataset):
    """Records -> samples. An unreadable image is skipped with a warning and the next record is returned,
    so one bad file in a million cannot end a training run; a long run of bad ones means a wrong path."""

    def __init__(self, records: Sequence[Record], max_words: int = 50) -> None:
        self.records = list(records)
        self.max_words = max_words

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        tries = min(_MAX_CONSECUTIVE_BAD, len(self.records))
        for offset in range(tries):
            record = self.records[(index + offset) % len(self.records)]
            try:
                image = load_image(record.image)
            except InputError as exc:
                warnings.warn(f"skipping sample: {exc}", SkippedSampleWarning, stacklevel=2)
                continue
            return self._sample(record, image)
        raise UsageError(f"{tries} unreadable images in a row from {self.records[index].image}: check the data paths")

    def _sample(self, record: Record, image: Image.Image) -> Sample:
        sample = {"image": image, "image_id": record.image_id, "path": str(record.image)}
        if record.question is not None:
            sample["text"] = clean_question(record.question, self.max_words)
            sample["answers"] = list(record.answers)
        else:
            # CapFilt keeps two captions per web image and samples one at each step (paper §3.4)
            sample["text"] = clean_caption(random.choice(record.captions), self.max_words)
        return sample


def read_coco(path: Path, image_root: Path) -> list[Record]:
    """COCO caption JSON: one record per annotation (five per image); COCO's integer image ids are kept."""
    data = _read_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise UsageError(f"{path}: not a COCO caption file (expected keys 'images' and 'annotations')")
    images = [_require(image, ("id", "file_name"), f"{path} images[{i}]") for i, image in enumerate(data["images"])]
    files = {image["id"]: image["file_name"] for image in images}
    records = []
    for i, ann in enumerate(data["annotations"]):
        _require(ann, ("image_id", "caption"), f"{path} annotations[{i}]")
        if ann["image_id"] not in files:
            raise UsageError(f"{path}: annotation {ann.get('id')} names unknown image_id {ann.get('image_id')}")
        records.append(Record(image_root / files[ann["image_id"]], ann["image_id"], (str(ann["caption"]),)))
    return _checked(records, path, image_root)


def read_lavis_json(path: Path, image_root: Path) -> list[Record]:
    """LAVIS/BLIP annotation JSON `[{image, caption, image_id}]`; `caption` may be a list."""
    data = _read_json(path)
    if not isinstance(data, list):
        raise UsageError(f"{path}: expected a JSON list of {{image, caption}} objects")
    rows = [_require(row, ("image", "caption"), f"{path} item {i}") for i, row in enumerate(data)]
    return _checked(_caption_records(rows, image_root), path, image_root)


def read_jsonl(path: Path, image_root: Path) -> list[Record]:
    """JSON Lines of `{image, caption}` (caption may be a list) or `{image, question, answers}`, not mixed."""
    rows = [_parse_line(line, path, number) for number, line in enumerate(_read_text(path).splitlines(), 1)]
    rows = [(number, _capfilt_row(row)) for number, row in enumerate(rows, 1) if row is not None]
    rows = [(number, row) for number, row in rows if row is not None]
    is_vqa = bool(rows) and isinstance(rows[0][1], dict) and "question" in rows[0][1]
    keys = ("image", "question", "answers") if is_vqa else ("image", "caption")
    checked = [_require(row, keys, f"{path} line {number}") for number, row in rows]
    records = _question_records(checked, image_root) if is_vqa else _caption_records(checked, image_root)
    return _checked(records, path, image_root)


def _capfilt_row(row: Any) -> Any:
    """`blip2 capfilt` records carry `captions: [...]` (the kept texts, one sampled per step) instead of `caption`;
    an image whose every text was filtered out (`captions: []`) is left out."""
    if isinstance(row, dict) and "caption" not in row and isinstance(row.get("captions"), list):
        return {**row, "caption": row["captions"]} if row["captions"] else None
    return row


def read_folder(folder: Path) -> list[Record]:
    """Images with caption sidecars (`photo.jpg` + `photo.txt`); each non-empty line of the .txt is a caption,
    one sampled per step. Images without a sidecar are left out (one warning with the count)."""
    if not folder.is_dir():
        raise UsageError(f"no such folder: {folder}")
    images = images_in_folder(folder)
    records = [Record(p, i, tuple(_sidecar_lines(p))) for i, p in enumerate(images) if p.with_suffix(".txt").is_file()]
    records = [r for r in records if r.captions]
    if not records:
        raise UsageError(f"no captioned images in {folder} (expected photo.jpg beside photo.txt)")
    if len(records) < len(images):
        warnings.warn(f"{len(images) - len(records)} images in {folder} have no caption and are left out",
                      SkippedSampleWarning, stacklevel=2)  # fmt: skip
    return records


def _sidecar_lines(image: Path) -> list[str]:
    return [line.strip() for line in _read_text(image.with_suffix(".txt")).splitlines() if line.strip()]


def _caption_records(rows: list[dict], image_root: Path) -> list[Record]:
    return [
        Record(image_root / row["image"], image_id, captions=_texts(row["caption"], row, "caption"))
        for row, image_id in zip(rows, _image_ids(rows))
    ]


def _question_records(rows: list[dict], image_root: Path) -> list[Record]:
    return [
        Record(image_root / row["image"], image_id, (), str(row["question"]), _texts(row["answers"], row, "answers"))
        for row, image_id in zip(rows, _image_ids(rows))
    ]


def _image_ids(rows: list[dict]) -> list[int]:
    """The file's integer `image_id`s when every row has one (COCO ids are globally unique); otherwise a running
    index per distinct image, so captions of one image share an id (multi-positive ITC needs that)."""
    given = [row.get("image_id") for row in rows]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in given):
        return given
    index: dict[str, int] = {}
    return [index.setdefault(str(row["image"]), len(index)) for row in rows]


def _texts(value: Any, row: dict, field: str) -> tuple[str, ...]:
    """A caption or answer, or a list of them; an empty list is an error (there would be nothing to sample)."""
    if isinstance(value, list) and not value:
        raise UsageError(f"empty '{field}' list for image {row['image']}")
    return tuple(str(v) for v in value) if isinstance(value, list) else (str(value),)


def _checked(records: list[Record], path: Path, image_root: Path) -> list[Record]:
    """Fail early, in one line, when the first image is not where the annotations say (a wrong image_root)."""
    if not records:
        raise UsageError(f"{path}: no annotations")
    if not records[0].image.exists():
        raise UsageError(f"{path}: image not found: {records[0].image} (is image_root '{image_root}' right?)")
    return records


def _require(row: Any, keys: tuple[str, ...], where: str) -> dict:
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected an object, got {type(row).__name__}")
    missing = [key for key in keys if key not in row]
    if missing:
        raise UsageError(f"{where}: missing '{missing[0]}'")
    return row


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def _parse_line(line: str, path: Path, number: int) -> Any:
    """One JSON Lines record; None for a blank line."""
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} line {number}: not valid JSON ({exc.msg})") from None


# ---------------------------------------------------------------------------------------------------------------
# WebDataset shards (ecosystem §5)

_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def shard_urls(path: str) -> list[str]:
    """A folder of .tar files, a glob, a brace pattern or one shard/URL -> the list of shards, sorted."""
    from webdataset.shardlists import expand_urls

    if Path(path).is_dir():
        urls = sorted(str(p) for p in Path(path).glob("*.tar"))
    elif "{" in path:
        urls = list(expand_urls(path))
    elif any(c in path for c in "*?["):
        urls = sorted(glob.glob(path))
    else:
        urls = [path]
    if not urls:
        raise UsageError(f"no .tar shards found in {path}")
    missing = [url for url in urls if ":" not in url.split("/")[0] and not Path(url).is_file()]
    if missing:
        raise UsageError(f"no such shard: {missing[0]}")
    return urls


def webdataset_stream(
    urls: list[str], resampled: bool = False, shuffle: int = 1000, max_words: int = 50
) -> IterableDataset:
    """Shards -> a stream of samples, split across nodes and DataLoader workers.

    Pitfalls avoided (ecosystem §5): the node splitter is explicit (the default raises under DDP); resampled
    streams pass `shardshuffle=False` (or they warn) and are endless, so the trainer counts steps or calls
    `.with_epoch(n)`; without resampling, each rank x worker needs at least one shard. Shuffling happens before
    decoding, while the buffer holds compressed bytes. Members are read in memory and never written to disk, so
    member names ("../x.jpg") cannot escape anywhere."""
    import webdataset as wds

    shard_shuffle = False if resampled or not shuffle else len(urls)
    stream = wds.WebDataset(
        urls, resampled=resampled, shardshuffle=shard_shuffle, nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker, handler=skip_with_warning, cache_dir=None,
    )  # fmt: skip
    if shuffle:
        stream = stream.shuffle(shuffle, initial=min(shuffle, 1000))
    return stream.map(partial(decode_shard_sample, max_words=max_words), handler=skip_with_warning)


def skip_with_warning(exc: Exception) -> bool:
    """WebDataset handler: report the bad sample or shard and keep going (the default handler re-raises)."""
    warnings.warn(f"skipping sample: {exc}", SkippedSampleWarning, stacklevel=2)
    return True


def decode_shard_sample(raw: dict[str, Any], max_words: int = 50) -> Sample:
    """A raw tar sample ({"__key__", "__url__", "jpg": bytes, "json"/"txt": bytes}) -> a sample dict."""
    fields = {key.lower(): value for key, value in raw.items()}
    name = f"{raw.get('__url__', '')}#{raw.get('__key__', '')}"
    image_bytes = next((fields[key] for key in _IMAGE_KEYS if key in fields), None)
    if image_bytes is None:
        raise InputError(f"no jpg/png/webp image in sample {name}")
    meta = _json_field(fields.get("json"), name)
    caption = _shard_caption(meta, fields.get("txt"), name)
    image = load_image_bytes(image_bytes, name)
    text = clean_caption(caption, max_words)
    return {"image": image, "text": text, "image_id": _shard_image_id(meta, raw), "path": name}


def _json_field(data: bytes | None, name: str) -> dict:
    if data is None:
        return {}
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"bad json in sample {name}: {exc}") from None
    return meta if isinstance(meta, dict) else {}


def _shard_caption(meta: dict, txt: bytes | None, name: str) -> str:
    """`captions: [...]` (CapFilt's top two, one sampled per step, paper §3.4) > `txt` > json `caption`."""
    captions = meta.get("captions")
    if isinstance(captions, list) and captions:
        return str(random.choice(captions))
    if txt is not None:
        return txt.decode("utf-8", errors="replace")
    if isinstance(meta.get("caption"), str):
        return meta["caption"]
    raise InputError(f"no caption (txt, or json caption/captions) in sample {name}")


def _shard_image_id(meta: dict, raw: dict[str, Any]) -> int:
    """json `image_id` if an int, else the numeric key (img2dataset keys are shard id + index, unique), else a
    stable 63-bit hash of shard and key: a running index would repeat across workers and ranks."""
    if isinstance(meta.get("image_id"), int):
        return meta["image_id"]
    key = str(raw.get("__key__", ""))
    if key.isdigit():
        return int(key)
    digest = hashlib.blake2b(f"{raw.get('__url__', '')}#{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1

