"""Scores over stored query vectors (numpy in, numpy out): the max-over-queries ITC cosine (the one definition,
`model.losses.itc_similarity`), image-to-image similarity, and the exact scan that index recall is measured against.
Shared by `index` (measuring a FAISS index) and `rank` (search)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from blip2cli.model.losses import itc_similarity
from blip2cli.retrieval.store import Store


def _as_tensor(a: np.ndarray) -> Any:
    import torch

    # torch converts float16 -> float32 about 4x faster than numpy on CPU, the bulk of re-scoring.
    return torch.from_numpy(np.ascontiguousarray(a)).float()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Re-scoring a few hundred matrices is ~1 ms of work: on a busy machine torch's thread pool waits for
    descheduled workers and the same call took 20 ms with 2 threads (load 4, 2 cores), 1 ms with one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def itc_scores(mats: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Max over queries of the cosine: mats (n, Q, D) and one text vector (D,) -> (n,) float32."""
    if len(mats) == 0:
        return np.empty(0, dtype=np.float32)
    with _one_thread():
        return itc_similarity(_as_tensor(mats), _as_tensor(text)[None])[:, 0].numpy()  # (n, 1) -> (n,)


def image_scores(mats: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Symmetric mean-of-max similarity of each image (n, Q, D) to a query image (Q, D) -> (n,) float32."""
    if len(mats) == 0:
        return np.empty(0, dtype=np.float32)
    with _one_thread():
        sims = _as_tensor(mats) @ _as_tensor(query).T  # (n, Q, Q')
        return ((sims.amax(dim=2).mean(dim=1) + sims.amax(dim=1).mean(dim=1)) / 2).numpy()


def exact_search(store: Store, texts: np.ndarray, k: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over every live image: texts (T, D) -> (rows, scores), each (T, k), best first.

    The reference that index recall is measured against; streams the store in chunks."""
    t = _as_tensor(texts.astype(np.float32))  # (T, D)
    best_rows = np.empty((len(texts), 0), dtype=np.int64)
    best = np.empty((len(texts), 0), dtype=np.float32)
    for rows, mats in store.iter_live("query", chunk):
        scores = itc_similarity(_as_tensor(mats), t).numpy().T  # (n, T) -> (T, n)
        best = np.concatenate([best, scores], axis=1)
        best_rows = np.concatenate([best_rows, np.broadcast_to(rows, scores.shape)], axis=1)
        top = np.argsort(-best, axis=1, kind="stable")[:, :k]
        best, best_rows = np.take_along_axis(best, top, 1), np.take_along_axis(best_rows, top, 1)
    return best_rows, best
