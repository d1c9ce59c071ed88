"""Decode images ahead of the model: a small thread pool keeps the next batches ready while the current one runs
(PIL decoding and torch both release the GIL, so the model never waits on JPEG decoding)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def prefetch(
    batches: Sequence[Sequence[T]], load: Callable[[T], R], threads: int = 2, ahead: int = 2
) -> Iterator[list[R]]:
    """Yield `[load(x) for x in batch]` for each batch in order, `ahead` batches loaded in `threads` background
    threads. An exception from `load` surfaces when its batch is reached; pending work is cancelled on exit."""
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="blip2-decode")
    pending: deque[list[Future[R]]] = deque()
    try:
        for batch in batches[:ahead]:
            pending.append([pool.submit(load, item) for item in batch])
        for i in range(len(batches)):
            loaded = [future.result() for future in pending.popleft()]
            if i + ahead < len(batches):
                pending.append([pool.submit(load, item) for item in batches[i + ahead]])
            yield loaded
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
