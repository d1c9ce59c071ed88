"""Scoring and ranking: exact ITC from stored query matrices, ITM re-ranking, image-to-image similarity, dedup.

BLIP-2 scores an image against a text by its best query vector's cosine (LAVIS compute_sim_matrix), so images are
always scored from their full (Q, D) matrix, never from one vector; the index only proposes candidates. With ITM
re-ranking the score is the mean-over-queries positive ITM logit plus that cosine (LAVIS compute_sim_matrix, #645).

Image-to-image is not defined upstream (LAVIS). Our rule: the symmetric mean-of-max (Chamfer) similarity,
    sim(A, B) = 1/2 * (mean_q max_p <A_q, B_p> + mean_p max_q <A_q, B_p>),
the image analogue of max-over-queries: every query vector of one image is matched with its best partner in the
other, and averaging both directions makes it symmetric with sim(A, A) = 1. It is reported as `itc` and `score`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from blip2cli.errors import InputError, UsageError
from blip2cli.model.quantize import CHOICES
from blip2cli.retrieval.index import LoadedIndex
from blip2cli.retrieval.scores import exact_search, image_scores, itc_scores  # noqa: F401  (exact_search: tests)
from blip2cli.retrieval.store import Store

ItmFn = Callable[[list[str]], np.ndarray]  # image paths -> (B,) positive ITM logits, NaN where a file failed


class Candidates(Protocol):
    def candidates(self, vectors: np.ndarray, want: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Hit:
    rank: int
    path: str
    score: float
    itc: float
    itm: float | None
    copies: tuple[str, ...] = ()  # other existing files with the same bytes (one content, so one hit)

    def record(self) -> dict[str, Any]:
        """The contract's JSON line: {"rank", "path", "score", "itc", "itm"}, plus "copies" when there are any."""
        record = {"rank": self.rank, "path": self.path, "score": self.score, "itc": self.itc, "itm": self.itm}
        return record | {"copies": list(self.copies)} if self.copies else record


@dataclass
class SearchResult:
    hits: list[Hit]
    skipped: list[str] = field(default_factory=list)  # indexed files that no longer exist (or failed to re-load)
    stale_index: bool = False  # the store changed after the index was written (an interrupted `blip2 index`)
    model: str = ""  # the model that embedded the query (the index's own unless another was asked for)
    quantize: str = "none"  # how its weights were quantized (the index's own unless another was asked for)


class QueryEncoder(Protocol):
    """What search needs from a model (indexer.ModelEncoder)."""

    name: str
    fingerprint: str

    def prepare(self, image: Any) -> Any: ...
    def embed(self, prepared: list[Any]) -> np.ndarray: ...  # (B, Q, D)
    def text(self, texts: Sequence[str]) -> np.ndarray: ...  # (T, D)
    def itm(self, paths: list[str], text: str) -> np.ndarray: ...  # (B,) positive logits, NaN on failure


def search_index(
    index_dir: Path,
    encoder: Callable[[str, str], QueryEncoder],
    text: str | None = None,
    image: str | Path | None = None,
    *,
    model: str | None = None,
    quantize: str | None = None,
    k: int = 10,
    rerank_k: int | None = 128,
    dedup_threshold: float | None = None,
) -> SearchResult:
    """`blip2 search`: a text (ITC, then ITM re-rank of the best `rerank_k` unless None) or an image query against
    an index folder. `encoder(name, quantize)` loads `model` quantized as `quantize`, by default the model and the
    quantization the index was built with; another model's or another quantization's vectors are refused."""
    from blip2cli.data.images import load_source

    with Store.open(index_dir) as store:
        loaded = LoadedIndex.load(index_dir, store)
        if quantize is not None:  # an explicit other quantization: refused before the model loads
            if quantize not in CHOICES:
                raise UsageError(f"--quantize: expected none, int8 or int4, got {quantize!r}")
            store.check_quantize(quantize)
        quantize = quantize or store.info.quantize
        enc = encoder(model or store.info.model, quantize)
        store.check_model(enc.name, enc.fingerprint)
        if image is not None:
            try:
                picture = load_source(image)  # a file, "-" (standard input) or an http(s) URL
            except InputError as exc:
                raise UsageError(f"--image: {exc}") from None
            query = enc.embed([enc.prepare(picture)])[0]  # (Q, D)
            run = functools.partial(search_image, store, loaded, query)
        else:
            assert text is not None
            itm_fn = None if rerank_k is None else (lambda paths: enc.itm(paths, text))
            run = functools.partial(search_text, store, loaded, enc.text([text])[0], rerank_k=rerank_k or 0,
                                    itm_fn=itm_fn)
        result = run(k=k) if dedup_threshold is None else _refilled(store, run, k, dedup_threshold)
        result.stale_index = loaded.stale
        result.model, result.quantize = enc.name, quantize
    return result


def _refilled(store: Store, run: Callable[[int], SearchResult], k: int, threshold: float) -> SearchResult:
    """`run(k=n)` for the top n, deduplicated; n grows until k hits survive or the collection has no more."""
    want = 2 * k
    while True:
        result = run(k=want)
        kept = dedup(store, result.hits, threshold)
        if len(kept) >= k or len(result.hits) < want:
            result.hits = kept[:k]
            return result
        want *= 4


def search_text(
    store: Store,
    index: Candidates,
    text: np.ndarray,
    k: int = 10,
    rerank_k: int = 128,
    itm_fn: ItmFn | None = None,
    exists: Callable[[str], bool] = os.path.isfile,
) -> SearchResult:
    """Top-k images for one text vector (D,). With `itm_fn`, the best max(k, rerank_k) by ITC are re-ranked by
    ITM logit + ITC (LAVIS k_test); files deleted since indexing are skipped and listed in `skipped`."""
    need = max(k, rerank_k) if itm_fn is not None else k
    found, skipped = _ranked_live(store, index, text[None], need, lambda m: itc_scores(m, text), exists)
    if itm_fn is None:
        return SearchResult([Hit(i + 1, p, s, s, None, cp) for i, (p, s, cp) in enumerate(found[:k])], skipped)
    itm = np.asarray(itm_fn([p for p, _, _ in found]), dtype=np.float64)  # (B,)
    scored = [(p, float(m) + c, c, float(m), cp) for (p, c, cp), m in zip(found, itm) if not np.isnan(m)]
    skipped += [p for (p, _, _), m in zip(found, itm) if np.isnan(m)]
    scored.sort(key=lambda h: -h[1])
    return SearchResult([Hit(i + 1, p, s, c, m, cp) for i, (p, s, c, m, cp) in enumerate(scored[:k])], skipped)


def search_image(
    store: Store, index: Candidates, query: np.ndarray, k: int = 10, exists: Callable[[str], bool] = os.path.isfile
) -> SearchResult:
    """Top-k images for a query image's (Q, D) matrix by the symmetric mean-of-max similarity (module docstring)."""
    found, skipped = _ranked_live(store, index, query, k, lambda m: image_scores(m, query), exists)
    return SearchResult([Hit(i + 1, p, s, s, None, cp) for i, (p, s, cp) in enumerate(found)], skipped)


def _ranked_live(
    store: Store,
    index: Candidates,
    vectors: np.ndarray,
    need: int,
    score: Callable[[np.ndarray], np.ndarray],
    exists: Callable[[str], bool],
) -> tuple[list[tuple[str, float, tuple[str, ...]]], list[str]]:
    """The `need` best (path, score, copies) whose file still exists, scored exactly; widens the candidate pool
    when stale files eat into it. A content held by several paths is one hit, under its first existing path, with
    the other existing paths as its copies."""
    want = need + 8
    while True:
        rows = index.candidates(vectors, want)
        scores = score(store.queries(rows))
        order = np.argsort(-scores, kind="stable")
        paths = store.paths(rows)
        found: list[tuple[str, float, tuple[str, ...]]] = []
        skipped: list[str] = []
        for i in order:
            held = paths.get(int(rows[i]), [])  # empty: the content was dropped after the index was written
            live = next((p for p in held if exists(p)), None)
            skipped += [p for p in held if live is None]
            if live is not None:
                copies = tuple(p for p in held if p != live and exists(p))
                found.append((live, float(scores[i]), copies))
                if len(found) == need:
                    break
        if len(found) == need or len(rows) < want:  # enough, or the index has nothing more to give
            return found, skipped
        want *= 4


def dedup(store: Store, hits: list[Hit], threshold: float = 0.94) -> list[Hit]:
    """Drop near-duplicates among hits (pooled cosine >= threshold with a better hit), as clip-retrieval does;
    ranks are renumbered. Byte-identical files are already one hit, which lists them as its copies."""
    if not hits:
        return hits
    rows = np.array([store.row_of_path(h.path) for h in hits], dtype=np.int64)
    vecs = store.pooled(rows).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    kept: list[int] = []
    for i in range(len(hits)):
        if not kept or float((vecs[kept] @ vecs[i]).max()) < threshold:
            kept.append(i)
    return [Hit(n + 1, hits[i].path, hits[i].score, hits[i].itc, hits[i].itm, hits[i].copies)
            for n, i in enumerate(kept)]
