"""`blip2 index` as a library call: diff files against the store, embed what is new, drop what is gone, refresh the
index. Interrupt-safe: a `kill -9` at any moment followed by a rerun ends in the same store and index as one
uninterrupted run, because every batch is one SQLite transaction (rows fsynced first, see store.py) and index files
are replaced atomically behind a manifest (index.py).

The diff, per INPUT path: same size and mtime as stored -> unchanged, without reading it; otherwise its sha256 is
computed: the stored hash (a touched file) -> unchanged; a hash already embedded (a copy, a moved file) -> linked
to that row without decoding; else decoded and embedded. Stored paths that no longer exist are dropped, after the
additions, so a moved file keeps its row. Decoding, hashing and pre-processing run in a thread pool, a bounded
window ahead of the model.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from blip2cli.data.prefetch import prefetch
from blip2cli.errors import Failure, InputError, Interrupted, UsageError
from blip2cli.files import check_regular, disk_full, is_disk_full, os_error_message
from blip2cli.retrieval import index as index_mod
from blip2cli.retrieval.store import FileEntry, NewContent, Store, StoreInfo, sha256_file

DEFAULT_MODEL = "Salesforce/blip2-itm-vit-g"
T = TypeVar("T")
Progress = Callable[[Iterable[T], int, str], Iterable[T]]


class ImageEncoder(Protocol):
    """What indexing needs from a model; `ModelEncoder` wraps Blip2, tests pass a fake."""

    name: str
    fingerprint: str
    num_queries: int
    dim: int

    def prepare(self, image: Any) -> Any:
        """PIL image -> model input; runs in the decode threads."""

    def embed(self, prepared: list[Any]) -> np.ndarray:
        """A batch of prepared images -> (B, Q, D) float32 L2-normalised ITC query vectors."""


@dataclass
class FnEncoder:
    """An encoder from a plain `embed_fn(list[PIL.Image]) -> (B, Q, D)`: tests and custom models."""

    embed_fn: Callable[[list[Any]], np.ndarray]
    name: str
    fingerprint: str
    num_queries: int = 32
    dim: int = 256

    def prepare(self, image: Any) -> Any:
        return image

    def embed(self, prepared: list[Any]) -> np.ndarray:
        return np.asarray(self.embed_fn(prepared), dtype=np.float32)


class ModelEncoder:
    """A loaded Blip2 seen as an image encoder, a text encoder and an ITM scorer (torch imported lazily)."""

    def __init__(self, model: Any, batch_size: int = 32) -> None:
        self.model = model
        self.name, self.fingerprint = model.name, model.fingerprint
        self.num_queries, self.dim = model.cfg.qformer.num_queries, model.cfg.qformer.embed_dim
        self.batch_size = batch_size

    def prepare(self, image: Any) -> Any:
        from blip2cli.data.transforms import eval_pixel

        cfg = self.model.cfg
        return eval_pixel(image, cfg.vision.image_size, cfg.image_mean, cfg.image_std)  # (3, S, S)

    def embed(self, prepared: list[Any]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            embeds = self.model.vision_embeds(torch.stack(prepared))  # (B, N, Dv)
            return self.model.image_features(embeds).float().cpu().numpy()  # (B, Q, D)

    def text(self, texts: Sequence[str]) -> np.ndarray:
        """(T, D) ITC text vectors for raw texts (cleaned here as `blip_caption`)."""
        import torch

        from blip2cli.data.transforms import clean_caption

        with torch.inference_mode():
            return self.model.text_features([clean_caption(t) for t in texts]).float().cpu().numpy()

    def itm(self, paths: list[str], text: str) -> np.ndarray:
        """Positive ITM logits (B,) for `text` against image files, re-encoded from disk (decoded in threads while
        the model runs); NaN where a file cannot be read any more."""
        import torch

        from blip2cli.data.transforms import clean_caption

        out = np.full(len(paths), np.nan)
        clean = clean_caption(text)
        pixels = prefetch(paths, self._pixels_or_none, threads=4, ahead=2 * self.batch_size)  # decoding ahead
        for start in range(0, len(paths), self.batch_size):
            batch = [(i, next(pixels)) for i in range(start, min(start + self.batch_size, len(paths)))]
            ok = [i for i, x in batch if x is not None]
            if ok:
                with torch.inference_mode():
                    embeds = self.model.vision_embeds(torch.stack([x for _, x in batch if x is not None]))
                    out[ok] = self.model.itm_logits(embeds, [clean] * len(ok))[:, 1].float().cpu().numpy()
        return out

    def _pixels_or_none(self, path: str) -> Any:
        from blip2cli.data.images import load_image

        try:
            return self.prepare(load_image(path))
        except InputError:
            return None


def load_encoder(model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 32,
                 quantize: str = "none", revision: str | None = None, cache_dir: Path | None = None) -> ModelEncoder:
    """`--model` for index and search (a hub id at `revision`, downloaded into `cache_dir`)."""
    from blip2cli.model.capabilities import require
    from blip2cli.model.load import load_model

    net = load_model(model, device, dtype, quantize=quantize, revision=revision, cache_dir=cache_dir)
    require(net, "retrieval", "retrieval (index, search)", model)  # before any image is read or any file written
    return ModelEncoder(net, batch_size)


@dataclass
class IndexReport:
    index: str
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: list[Failure] = field(default_factory=list)
    total: int = 0

    def record(self) -> dict[str, Any]:
        """The contract's final line."""
        return {
            "index": self.index,
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "failed": [{"path": f.path, "error": f.error} for f in self.failed],
            "total": self.total,
        }


@dataclass
class _Todo:
    path: str
    size: int
    mtime_ns: int
    old: FileEntry | None  # what the store had under this path


@dataclass
class _Prepared:
    todo: _Todo
    sha256: str = ""
    width: int = 0
    height: int = 0
    pixels: Any = None
    error: str = ""


def _no_progress(items: Iterable[T], total: int, description: str) -> Iterable[T]:
    return items


def index_images(
    paths: Sequence[str | Path],
    index_dir: Path,
    encoder: Callable[[str], ImageEncoder],
    *,
    model: str | None = None,
    batch_size: int = 32,
    workers: int = 4,
    index_key: str | None = None,
    progress: Progress = _no_progress,
    export: Path | None = None,
) -> IndexReport | None:
    """Bring `index_dir` in line with `paths`. `encoder(name)` loads the model `model` (default: the store's own,
    else DEFAULT_MODEL), only when something must be embedded or a differently named `model` must be checked.
    Under `accelerate launch` / torchrun (WORLD_SIZE > 1) the work is shared; ranks other than 0 return None."""
    index_dir = Path(index_dir)
    options = {"model": model, "batch_size": batch_size, "workers": workers, "progress": progress}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _index_sharded(paths, index_dir, encoder, index_key=index_key, export=export, **options)
    report = IndexReport(str(index_dir))
    todo: list[_Todo] = []
    row_bytes = (32 + 1) * 256 * 2  # BLIP-2's query + pooled rows in float16, until the store says
    try:
        try:
            store, enc = _open_store(index_dir, encoder, model)
        except KeyboardInterrupt:  # while the model loads: nothing was written
            raise Interrupted(f"interrupted before anything was indexed into {index_dir}; rerun to start") from None
        row_bytes = (store.info.num_queries + 1) * store.info.dim * 2
        try:
            todo, seen = _diff(store, paths, report)
            if todo:
                enc = enc or _checked_encoder(encoder, store, model)
                _embed(store, enc, todo, report, batch_size, workers, progress, store.has_content)
            _finish(store, index_dir, seen, report, index_key, export)
        except KeyboardInterrupt:
            raise _interrupted(store, index_dir) from None
        finally:
            store.close()
    except (OSError, sqlite3.Error) as exc:  # DiskFull from a file written whole names that file: it passes
        if not is_disk_full(exc, index_dir):
            raise
        raise disk_full(index_dir, _space_needed(index_dir, len(todo), row_bytes)) from None
    return report


def _interrupted(store: Store, index_dir: Path) -> Interrupted:
    """What Ctrl-C leaves: every committed batch is kept; search uses the index as of the last complete run."""
    built = (index_dir / index_mod.MANIFEST).is_file()
    searchable = "`blip2 search` uses its last complete index until then" if built else "searchable once a run completes"
    return Interrupted(f"interrupted: {store.count_files()} files are saved in {index_dir} ({searchable}); rerun the "
                       "same command to go on")  # fmt: skip


def _space_needed(index_dir: Path, todo: int, row_bytes: int) -> int:
    """About what finishing needs: each new image's rows (query + pooled float16) and its float32 vectors in a
    Flat index (worst case), plus a new copy of the current index file, written before the old one goes."""
    current = sum(p.stat().st_size for p in index_dir.glob("index-*.faiss")) if index_dir.is_dir() else 0
    return todo * (3 * row_bytes + 1024) + current


def _open_store(
    index_dir: Path,
    encoder: Callable[[str], ImageEncoder],
    model: str | None,
) -> tuple[Store, ImageEncoder | None]:
    """The store for writing, created with the model's identity if new; a differently named --model is checked."""
    if index_dir.exists() and not index_dir.is_dir():
        raise UsageError(f"--index: {index_dir} is a file; give a folder (a new one is created)")
    if not Store.exists(index_dir):
        enc = encoder(model or DEFAULT_MODEL)
        return Store.create(index_dir, StoreInfo(enc.name, enc.fingerprint, enc.num_queries, enc.dim)), enc
    store = Store.open(index_dir, writable=True)
    if model is not None and model != store.info.model:
        return store, _checked_encoder(encoder, store, model)
    return store, None


def _checked_encoder(encoder: Callable[[str], ImageEncoder], store: Store, model: str | None) -> ImageEncoder:
    enc = encoder(model or store.info.model)
    store.check_model(enc.name, enc.fingerprint)
    return enc


def _finish(
    store: Store, index_dir: Path, seen: set[str], report: IndexReport, index_key: str | None, export: Path | None
) -> None:
    from blip2cli.retrieval.export import export_clip_retrieval

    _drop_missing(store, seen, report)
    store.drop_orphans()
    index_mod.update_index(store, index_dir, index_key)
    if export is not None:
        export_clip_retrieval(store, export)
    report.total = store.count_files()


def _index_sharded(
    paths: Sequence[str | Path],
    index_dir: Path,
    encoder: Callable[[str], ImageEncoder],
    *,
    model: str | None,
    batch_size: int,
    workers: int,
    index_key: str | None,
    progress: Progress,
    export: Path | None,
) -> IndexReport | None:
    """Each process embeds every WORLD_SIZE-th file of the (identical) to-do list into its own part store,
    INDEX_DIR/parts/rank-NNNNN, then writes rank-NNNNN.json (its counts and failures). Rank 0 waits for every
    .json, merges the parts in rank order, drops deleted files and builds the index. Only rank 0 writes the
    store, so a kill anywhere leaves it consistent; a rerun clears leftover parts and redoes what was not merged."""
    import torch
    from accelerate import PartialState

    # PartialState only sets up a CPU (gloo) group when asked; `accelerate launch --cpu` says so in the environment.
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    rank, world = state.process_index, state.num_processes
    parts = index_dir / "parts"
    enc = None
    if rank == 0:
        shutil.rmtree(parts, ignore_errors=True)
        store, enc = _open_store(index_dir, encoder, model)
    state.wait_for_everyone()  # the store exists, parts/ is clean
    if rank != 0:
        store = Store.open(index_dir)
    report, mine = IndexReport(str(index_dir)), IndexReport(str(index_dir))
    try:
        todo, seen = _diff(store, paths, report)
        if todo[rank::world]:
            enc = enc or _checked_encoder(encoder, store, model)
            with Store.create(parts / f"rank-{rank:05d}", store.info) as part:
                known = lambda sha: part.has_content(sha) or store.has_content(sha)
                _embed(part, enc, todo[rank::world], mine, batch_size, workers, progress, known)
        parts.mkdir(parents=True, exist_ok=True)
        done_file = parts / f"rank-{rank:05d}.json"
        index_mod.atomic_write(done_file, lambda f: f.write(json.dumps(mine.record()).encode()))
        if rank != 0:
            return None
        for r in range(world):
            # Files, not a collective barrier: shares can finish far apart, past NCCL's 10-minute timeout.
            while not (parts / f"rank-{r:05d}.json").exists():
                time.sleep(1.0)
            done = json.loads((parts / f"rank-{r:05d}.json").read_text())
            for key in ("added", "updated", "unchanged"):
                setattr(report, key, getattr(report, key) + done[key])
            report.failed += [Failure(f["path"], f["error"]) for f in done["failed"]]
            if (parts / f"rank-{r:05d}").is_dir():
                with Store.open(parts / f"rank-{r:05d}") as part:
                    _merge(store, part)
        stored = store.files()
        store.commit(remove=[f.path for f in report.failed if f.path in stored])  # bytes gone, vectors stale
        _finish(store, index_dir, seen, report, index_key, export)
        shutil.rmtree(parts, ignore_errors=True)
    finally:
        store.close()
    return report


def _merge(store: Store, part: Store) -> None:
    """Copy a part store's files into `store`, with vectors for the contents `store` does not have yet."""
    files = sorted(part.files().values(), key=lambda e: e.path)
    contents = part.contents()
    for i in range(0, len(files), 4096):
        chunk = files[i : i + 4096]
        new: dict[str, NewContent] = {}
        for e in chunk:
            if e.sha256 in contents and e.sha256 not in new and not store.has_content(e.sha256):
                new[e.sha256] = NewContent(e.sha256, *contents[e.sha256][1:])
        rows = np.array([contents[sha][0] for sha in new], dtype=np.int64)
        store.commit(list(new.values()), part.queries(rows) if new else None, chunk, drop_orphans=False)


def _diff(store: Store, paths: Sequence[str | Path], report: IndexReport) -> tuple[list[_Todo], set[str]]:
    """Split inputs into unchanged (by size + mtime) and to-do; returns the to-do list and every input path."""
    stored = store.files()
    todo: list[_Todo] = []
    seen: set[str] = set()
    for raw in sorted({os.path.abspath(p) for p in paths}):
        try:
            st = os.stat(raw)
            check_regular(raw, st)  # a named pipe or a link to /dev/zero is never read
        except OSError as exc:
            report.failed.append(Failure(raw, os_error_message(raw, exc)))
            continue
        except InputError as exc:
            report.failed.append(Failure(raw, str(exc)))
            continue
        seen.add(raw)
        old = stored.get(raw)
        if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
            report.unchanged += 1
        else:
            todo.append(_Todo(raw, st.st_size, st.st_mtime_ns, old))
    return todo, seen


def _prepare(item: _Todo, known: Callable[[str], bool], enc: ImageEncoder) -> _Prepared:
    """Worker thread: hash, and decode + pre-process only bytes the store has not embedded yet."""
    from blip2cli.data.images import load_image

    out = _Prepared(item)
    try:
        out.sha256 = sha256_file(item.path)
    except OSError as exc:
        out.error = f"cannot read {item.path}: {exc.strerror or exc}"
        return out
    except InputError as exc:  # no longer a regular file (replaced by a pipe since the diff)
        out.error = str(exc)
        return out
    if (item.old is not None and item.old.sha256 == out.sha256) or known(out.sha256):
        return out  # no pixels: linked to its stored row
    try:
        image = load_image(item.path)
        out.width, out.height = image.size
        out.pixels = enc.prepare(image)
    except InputError as exc:
        out.error = str(exc)
    return out


def _prepared_in_order(
    todo: list[_Todo], known: Callable[[str], bool], enc: ImageEncoder, workers: int, window: int
) -> Iterator[_Prepared]:
    """Results in input order, at most `window` items ahead of the consumer (bounded memory)."""
    return prefetch(todo, lambda item: _prepare(item, known, enc), threads=workers, ahead=window)


def _embed(
    store: Store,
    enc: ImageEncoder,
    todo: list[_Todo],
    report: IndexReport,
    batch_size: int,
    workers: int,
    progress: Progress,
    known: Callable[[str], bool],
) -> None:
    """Hash, link or embed each to-do file, committing every `batch_size` embeddings. `known(sha)`: is this
    content embedded already (in `store`, or for a part store, in the main store too)."""
    batch: list[_Prepared] = []  # to embed
    files: list[FileEntry] = []  # paths to point at their content in the next commit
    remove: list[str] = []  # stored paths whose file can no longer be used

    def flush() -> None:
        mats = enc.embed([p.pixels for p in batch]) if batch else None
        new = [NewContent(p.sha256, p.width, p.height) for p in batch]
        store.commit(new, mats, files, remove)
        batch.clear(), files.clear(), remove.clear()

    def fail(item: _Todo, error: str) -> None:
        report.failed.append(Failure(item.path, error))
        if item.old is not None:
            remove.append(item.path)  # its stored vectors describe bytes that are gone

    for p in progress(_prepared_in_order(todo, known, enc, workers, 4 * batch_size), len(todo), "indexing"):
        item = p.todo
        if p.error:
            fail(item, p.error)
            continue
        if item.old is not None and item.old.sha256 == p.sha256:
            report.unchanged += 1  # touched, same bytes
        elif not (p.sha256 in {b.sha256 for b in batch} or known(p.sha256)):  # checked again at commit time
            if p.pixels is None:  # the worker saw it embedded, but this run has since dropped that content
                p = _prepare(_Todo(item.path, item.size, item.mtime_ns, None), lambda sha: False, enc)
                if p.error:
                    fail(item, p.error)
                    continue
            batch.append(p)
        report.updated += item.old is not None and item.old.sha256 != p.sha256
        report.added += item.old is None
        files.append(FileEntry(item.path, item.size, item.mtime_ns, p.sha256))
        if len(batch) >= batch_size or len(files) >= 4096:
            flush()
    flush()


def _drop_missing(store: Store, seen: set[str], report: IndexReport) -> None:
    """Drop stored paths that are gone from disk (paths outside this run's INPUTs are kept while they exist)."""
    gone = [path for path in store.files() if path not in seen and not os.path.isfile(path)]
    for i in range(0, len(gone), 4096):
        store.commit(remove=gone[i : i + 4096])
    report.removed += len(gone)
