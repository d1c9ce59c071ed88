"""Decode images ahead of the model: a small thread pool keeps the next items ready while the model works on the
current ones (PIL decoding and torch both release the GIL, so the model never waits on JPEG decoding). Used by
captioning, answering, benchmarks and indexing alike."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch(items: Iterable[T], load: Callable[[T], R], threads: int = 2, ahead: int = 16) -> Iterator[R]:
    """Yield `load(x)` for each item in order, computed in `threads` background threads at most `ahead` items
    before the consumer (bounded memory). An exception from `load` surfaces when its item is reached; work still
    pending is cancelled when the consumer stops."""
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="blip2-decode")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) >= max(1, ahead):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
