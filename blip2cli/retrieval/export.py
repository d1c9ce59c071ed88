"""Outputs for other tools and for people: the clip-retrieval embedding folder, and an HTML page of search hits.

clip-retrieval layout (ecosystem §2.1), readable by autofaiss (`autofaiss build_index --embeddings OUT/img_emb`),
clip-retrieval's back end and LAION tooling:

    OUT/img_emb/img_emb_{k:04d}.npy              float16 (n_k, D), pooled vectors, L2-normalised
    OUT/img_query_emb/img_query_emb_{k:04d}.npy  float16 (n_k, Q, D), BLIP-2's query matrices (others ignore it)
    OUT/metadata/metadata_{k:04d}.parquet        image_path, sha256, width, height; JSONL without pyarrow

Row i of every file of partition k is the same image; one row per file path (identical files repeat a vector).
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from blip2cli.files import atomic_write, atomic_write_text, json_line, printable
from blip2cli.retrieval.rank import Hit
from blip2cli.retrieval.store import Store

PARTITION_SIZE = 100_000  # images per partition: 51 MB of img_emb, 1.6 GB of img_query_emb


def export_clip_retrieval(store: Store, out_dir: Path, partition_size: int = PARTITION_SIZE) -> int:
    """Write the store in clip-retrieval layout under `out_dir`; returns the number of partitions.
    Each file is written whole then renamed; partitions left over from a larger earlier export are removed."""
    out_dir = Path(out_dir)
    for sub in ("img_emb", "img_query_emb", "metadata"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    entries = list(store.entries())
    parts = 0
    for k, start in enumerate(range(0, len(entries), partition_size)):
        chunk = entries[start : start + partition_size]
        rows = np.array([e[1] for e in chunk], dtype=np.int64)
        mats = store.queries(rows)  # (n, Q, D) float16
        pooled = store.pooled(rows).astype(np.float32)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)  # exactly unit before float16, as autofaiss expects
        _save_npy(out_dir / "img_emb" / f"img_emb_{k:04d}.npy", pooled.astype(np.float16))
        _save_npy(out_dir / "img_query_emb" / f"img_query_emb_{k:04d}.npy", mats)
        meta = [{"image_path": p, "sha256": sha, "width": w, "height": h} for p, _, sha, w, h in chunk]
        _save_metadata(out_dir / "metadata", f"metadata_{k:04d}", meta)
        parts = k + 1
    for path in out_dir.glob("*/*_[0-9][0-9][0-9][0-9].*"):  # stale partitions of an earlier, larger export
        if int(path.stem.rsplit("_", 1)[1]) >= parts:
            path.unlink()
    return parts


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda f: np.save(f, array), array.nbytes)


def _save_metadata(folder: Path, stem: str, rows: list[dict[str, Any]]) -> None:
    """Parquet (strings must be UTF-8: a name that is not is written with \\xNN escapes), else JSONL (\\udcXX)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # parquet is an extra (`pip install blip2cli[parquet]`)
        atomic_write_text(folder / f"{stem}.jsonl", "".join(json_line(r) for r in rows))
        return
    table = pa.Table.from_pylist([{**r, "image_path": printable(r["image_path"])} for r in rows])
    atomic_write(folder / f"{stem}.parquet", lambda f: pq.write_table(table, f), table.nbytes)


# ---------------------------------------------------------------------------------------------------------------
# HTML


def thumbnail_data_uri(path: str | Path, size: int = 256) -> str | None:
    """A base64 JPEG thumbnail (longest side `size`) as a data: URI, or None if the file cannot be read."""
    from blip2cli.data.images import load_image
    from blip2cli.errors import InputError

    try:
        image = load_image(path)
    except InputError:
        return None
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; background: #fafafa; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }} .sub {{ color: #666; margin-bottom: 16px; }}
.query {{ margin-bottom: 20px; color: #666; }} .query img {{ max-height: 160px; border-radius: 6px; display: block; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 16px; }}
.hit {{ background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 8px; }}
.hit img {{ width: 100%; height: 200px; object-fit: contain; background: #eee; border-radius: 4px; }}
.rank {{ font-weight: 600; }} .score {{ float: right; font-variant-numeric: tabular-nums; }}
.name {{ margin-top: 4px; font-size: 13px; overflow-wrap: anywhere; }} .file {{ overflow-wrap: anywhere; }}
.path {{ color: #555; font-size: 12px; overflow: hidden; text-overflow: ellipsis; }}
.path span {{ white-space: nowrap; }} .path span.file {{ white-space: normal; }}
.hit a {{ display: block; }} .nums {{ color: #777; font-size: 12px; }}
.missing {{ height: 200px; display: flex; align-items: center; justify-content: center; background: #eee; }}
</style></head><body>
<h1>{title}</h1><div class="sub">{subtitle}</div>{query}
<div class="grid">
{cards}
</div></body></html>
"""


def write_html(path: Path, hits: Sequence[Hit], text: str | None = None, image: Path | None = None, *,
               model: str | None = None, index: Path | None = None) -> None:
    """A self-contained page (thumbnails inlined as base64 JPEG, each linking to its original file) of search hits
    with their scores, naming the query, the model and the index."""
    cards = []
    for hit in hits:
        uri = thumbnail_data_uri(hit.path)
        name = html.escape(Path(hit.path).name, quote=True)
        picture = f'<img src="{uri}" alt="{name}">' if uri else '<div class="missing">cannot read image</div>'
        link = _file_link(hit.path)
        if link is not None:
            picture = f'<a href="{link}">{picture}</a>'
        itm = "" if hit.itm is None else f" · itm {hit.itm:.3f}"
        nums = "" if image is not None else f'<div class="nums">itc {hit.itc:.4f}{itm}</div>'  # image: score only
        cards.append(
            f'<div class="hit">{picture}<div><span class="rank">#{hit.rank}</span>'
            f'<span class="score">{hit.score:.4f}</span></div>{nums}'
            f'<div class="name" title="{html.escape(hit.path, quote=True)}">{_name_html(Path(hit.path).name)}</div>'
            f'<div class="path">{_folder_html(hit.path)}</div>'
            + "".join(f'<div class="path copy">same file: {_path_html(c)}</div>' for c in hit.copies) + "</div>"
        )
    query = ""
    if image is not None:
        uri = thumbnail_data_uri(image, 320)
        alt = html.escape(f"query image {Path(image).name}", quote=True)
        query = f'<div class="query"><img src="{uri}" alt="{alt}">query image</div>' if uri else ""
    title = f"blip2 search: {text}" if text is not None else f"blip2 search: images like {Path(image or '').name}"
    reranked = any(h.itm is not None for h in hits)
    subtitle = f"{len(hits)} hits · score = {'ITM logit + ITC cosine' if reranked else 'ITC cosine (max over queries)'}"
    if image is not None:
        subtitle = f"{len(hits)} hits · score = mean-of-max query-vector cosine"
    if model is not None:
        subtitle += f" · model {model}"
    if index is not None:
        subtitle += f" · index {index}"
    page = _PAGE.format(title=html.escape(title), subtitle=html.escape(subtitle), query=query, cards="\n".join(cards))
    atomic_write_text(Path(path), printable(page))  # names that are not UTF-8 shown as \\xNN


def _file_link(path: str) -> str | None:
    """A file:// URL for the original image (absolute, percent-encoded), or None where a path has no URL form."""
    try:
        return html.escape(Path(path).resolve().as_uri(), quote=True)
    except ValueError:
        return None


def _folder_html(path: str) -> str:
    """The folders of `path`, each kept whole on its line (breaks only after a "/"; one wider than the card is cut
    with an ellipsis, the full path is the name's tooltip)."""
    return "".join(f"<span>{html.escape(part)}</span>/<wbr>" for part in path.split("/")[:-1])


def _name_html(name: str) -> str:
    """A file name shown in full: it wraps at its spaces and after "_" and "-", and inside a run of letters only
    where that run alone is wider than the card (CSS overflow-wrap: anywhere)."""
    return "<wbr>".join(html.escape(part) for part in re.split(r"(?<=[_-])(?=.)", name))


def _path_html(path: str) -> str:
    """A whole path: its folders, then its file name, broken as `_folder_html` and `_name_html` say."""
    return f'{_folder_html(path)}<span class="file">{_name_html(path.split("/")[-1])}</span>'
