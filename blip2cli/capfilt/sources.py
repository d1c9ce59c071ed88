"""What `blip2 capfilt` reads: each input becomes groups of items (an image and its original text, if any).

A webdataset shard is one group (its output shard keeps its name); every other input is cut into groups of
`group_size` images in input order, named capfilt-NNNNN. Tar members are read into memory and never written to
disk; a member whose path is absolute or climbs out of the shard ("../x.jpg") is refused with one line, and a
truncated shard keeps the samples read before the cut (the shard is reported as failed).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip2cli.data.datasets import read_coco, read_jsonl, read_lavis_json
from blip2cli.data.inputs import expand_inputs
from blip2cli.errors import InputError, UsageError
from blip2cli.files import open_regular

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
TEXT_KEYS = ("caption", "text", "alt", "alt_text", "txt")  # where web shards keep the alt-text
MAX_MEMBER_BYTES = 64 << 20  # one image or json inside a shard; larger members are refused, not read
GROUP_SIZE = 1000


@dataclass(frozen=True)
class Item:
    """One image to caption. `key` is unique in the run and names the sample in output shards."""

    key: str
    name: str  # how records and messages call the image: its path, or shard.tar#key
    original: str | None  # the alt-text / human caption, None when the input has none
    path: Path | None = None  # the file to read, or
    data: bytes | None = None  # the image bytes from a shard
    ext: str = "jpg"  # the image member's extension in output shards
    meta: dict[str, Any] = field(default_factory=dict)  # the input json's other fields, carried to the output

    def image_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        with open_regular(self.path) as fh:  # never a named pipe or a device
            return fh.read()


@dataclass
class Group:
    name: str  # the output shard's stem
    items: list[Item]
    errors: list[str] = field(default_factory=list)  # one line each: bad members, a truncated shard


def read_sources(inputs: Sequence[str], group_size: int = GROUP_SIZE, image_root: Path | None = None) -> list[Group]:
    """Every input, in order. Shards: `.tar` files, brace patterns, or a folder holding only .tar files.
    Annotation files name images relative to `image_root` (default: the file's folder)."""
    groups: list[Group] = []
    loose: list[Item] = []  # items of non-shard inputs, grouped at the end
    for raw in inputs:
        shards = _shards(raw)
        if shards:
            groups.extend(read_shard(Path(s)) for s in shards)
        elif raw.endswith(".json"):
            loose.extend(_annotation_items(Path(raw), _read_json_records, image_root))
        elif raw.endswith(".jsonl"):
            loose.extend(_annotation_items(Path(raw), read_jsonl, image_root))
        else:
            loose.extend(_file_item(p) for p in expand_inputs([raw]))
    loose = _unique_keys(loose)
    for start in range(0, len(loose), group_size):
        groups.append(Group(f"capfilt-{start // group_size:05d}", loose[start:start + group_size]))
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"two input shards are both named {dup}.tar: their outputs would collide")
    return groups


def _shards(raw: str) -> list[str]:
    from blip2cli.data.datasets import shard_urls

    path = Path(raw)
    if raw.endswith((".tar", ".tar.gz", ".tgz")) or ("{" in raw and ".tar" in raw):
        return shard_urls(raw)
    if path.is_dir() and any(path.glob("*.tar")) and not any(p.is_file() and p.suffix != ".tar"
                                                             for p in path.iterdir() if not p.name.startswith(".")):
        return shard_urls(raw)
    return []


def _file_item(path: Path) -> Item:
    return Item(key=str(path), name=str(path), original=None, path=path, ext=_ext(path.name))


def _read_json_records(path: Path, image_root: Path):
    """COCO caption files (`{images, annotations}`) or LAVIS lists (`[{image, caption}]`)."""
    try:
        head = path.read_text(encoding="utf-8").lstrip()[:1]
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return read_coco(path, image_root) if head == "{" else read_lavis_json(path, image_root)


def _annotation_items(path: Path, reader, image_root: Path | None) -> list[Item]:
    """One item per image (COCO has five annotations an image: its first caption is the original)."""
    records = reader(path, image_root or path.parent)
    items: dict[Path, Item] = {}
    for record in records:
        if not record.captions:
            raise UsageError(f"{path}: expected captions, found questions (capfilt takes image-text data)")
        if record.image not in items:
            items[record.image] = Item(str(record.image), str(record.image), record.captions[0], path=record.image,
                                       ext=_ext(record.image.name), meta={"image_id": record.image_id})
    return list(items.values())


def _unique_keys(items: list[Item]) -> list[Item]:
    """Each file once; its key is a hash of its absolute path: stable across reruns (resume, seeds) and a valid
    webdataset key (no dots or slashes)."""
    out: dict[str, Item] = {}
    for item in items:
        key = hashlib.blake2b(str(Path(item.key).resolve()).encode("utf-8", "surrogateescape"),
                              digest_size=8).hexdigest()
        out.setdefault(key, Item(key, item.name, item.original, item.path, item.data, item.ext, item.meta))
    return list(out.values())


def _ext(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else "jpg"
    return ext if ext in IMAGE_MEMBERS else "jpg"


# ---------------------------------------------------------------------------------------------------------------
# Webdataset shards


def read_shard(path: Path) -> Group:
    """A shard's samples: members grouped by key (the path up to the first dot of the file name)."""
    group = Group(path.name.split(".")[0], [])
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with open_regular(path, max_bytes=1 << 50) as fh, tarfile.open(fileobj=fh, mode="r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                problem = _member_problem(member)
                if problem:
                    group.errors.append(f"{path.name}: {problem}")
                    continue
                key, ext = _split_member(member.name)
                fh = tar.extractfile(member)
                samples.setdefault(key, {})[ext] = fh.read() if fh is not None else b""
    except InputError as exc:  # not a regular file
        group.errors.append(str(exc))
    except (tarfile.TarError, EOFError, OSError) as exc:
        group.errors.append(f"{path.name}: truncated or not a tar file after {len(samples)} samples ({exc})")
    for key, fields in samples.items():
        item = _shard_item(path, key, fields, group)
        if item is not None:
            group.items.append(item)
    return group


def _member_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name
    parts = Path(name).parts
    if os.path.isabs(name) or ".." in parts:
        return f"member path escapes the shard: {name!r} (skipped)"
    if member.size > MAX_MEMBER_BYTES:
        return f"member {name!r} is {member.size >> 20} MiB, over the {MAX_MEMBER_BYTES >> 20} MiB limit (skipped)"
    return None


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: `dir/abc.seg.jpg` -> key `dir/abc`, field `seg.jpg` (lower-cased)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _shard_item(path: Path, key: str, fields: dict[str, bytes], group: Group) -> Item | None:
    name = f"{path.name}#{key}"  # shard names are unique in a run (read_sources checks)
    ext = next((e for e in IMAGE_MEMBERS if e in fields), None)
    if ext is None:
        group.errors.append(f"{name}: no jpg/png/webp image in the sample (skipped)")
        return None
    meta: dict[str, Any] = {}
    if "json" in fields:
        try:
            loaded = json.loads(fields["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            group.errors.append(f"{name}: bad json ({exc}); the original text is unknown")
            loaded = {}
        meta = loaded if isinstance(loaded, dict) else {}
    original = _original(meta, fields.get("txt"))
    if original is None and "json" not in fields and "txt" not in fields:
        group.errors.append(f"{name}: no json or txt in the sample; captioned without an original text")
    keep = {k: v for k, v in meta.items() if k not in ("captions", "scores", "original")}
    return Item(key.replace("/", "_"), name, original, data=fields[ext], ext=ext, meta=keep)


def _original(meta: dict[str, Any], txt: bytes | None) -> str | None:
    if txt is not None:
        return txt.decode("utf-8", errors="replace").strip() or None
    for key in TEXT_KEYS:
        if isinstance(meta.get(key), str) and meta[key].strip():
            return meta[key].strip()
    return None
