"""`blip2 search --dedup` refills to k hits, and byte-identical copies are listed with their hit, not hidden."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blip2cli.retrieval.index import LoadedIndex, update_index
from blip2cli.retrieval.rank import Hit, search_image, search_index
from blip2cli.retrieval.store import FileEntry, NewContent, Store, StoreInfo

Q, D = 4, 16


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class FakeEncoder:
    name, fingerprint = "fake", "fake-0"

    def __init__(self, vector: np.ndarray) -> None:
        self.vector = vector

    def text(self, texts):
        return self.vector[None]


@pytest.fixture
def store(tmp_path):
    with Store.create(tmp_path, StoreInfo("fake", "fake-0", Q, D, rows_per_shard=64)) as s:
        yield s


def _fill(store: Store, mats: np.ndarray, extra_paths: dict[int, list[str]] | None = None, root: str = "") -> list[str]:
    shas = [f"sha{i}" for i in range(len(mats))]
    files = [FileEntry(f"{root}/photos/{i:05d}.jpg", 1, 1, s) for i, s in enumerate(shas)]
    for i, paths in (extra_paths or {}).items():
        files += [FileEntry(p, 1, 1, shas[i]) for p in paths]
    store.commit([NewContent(s, 1, 1) for s in shas], mats, files)
    update_index(store, store.root)
    return [f.path for f in files]


def test_dedup_refills_to_k(store, tmp_path):
    rng = np.random.default_rng(0)
    target = unit(rng.standard_normal(D))
    near = unit(target[None, None] + 0.05 * rng.standard_normal((6, Q, D)))  # six re-encodings of one picture
    others = unit(rng.standard_normal((10, Q, D)))
    for path in _fill(store, np.concatenate([near, others]).astype(np.float32), root=str(tmp_path / "files")):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).touch()  # search skips files that no longer exist: these do

    def search(**kw):
        found = search_index(store.root, lambda name, quantize: FakeEncoder(target), "x", k=3, rerank_k=None, **kw).hits
        return [h.path.removeprefix(str(tmp_path / "files")) for h in found]

    plain = search()
    assert plain == [f"/photos/{i:05d}.jpg" for i in _rows_by_score(near, target)[:3]]  # all three near-copies
    deduped = search(dedup_threshold=0.9)
    assert len(deduped) == 3 and deduped[0] == plain[0]
    assert sum(p < "/photos/00006.jpg" for p in deduped) == 1  # one of the six near-copies, then two others


def _rows_by_score(mats: np.ndarray, text: np.ndarray) -> list[int]:
    return list(np.argsort(-(mats @ text).max(axis=1), kind="stable"))


def test_byte_identical_copies_are_listed_with_their_hit(store):
    mats = unit(np.random.default_rng(1).standard_normal((5, Q, D))).astype(np.float32)
    _fill(store, mats, {2: ["/backup/00002.jpg", "/phone/IMG_2.jpg"]})
    hits = search_image(store, LoadedIndex.load(store.root, store), mats[2], k=5, exists=lambda p: True).hits
    assert hits[0].path == "/backup/00002.jpg"  # the first path holding the content, in sorted order
    assert hits[0].copies == ("/phone/IMG_2.jpg", "/photos/00002.jpg") and len(hits) == 5
    assert hits[0].record()["copies"] == ["/phone/IMG_2.jpg", "/photos/00002.jpg"]
    assert "copies" not in hits[1].record()  # the contract's five fields when there is nothing to add


def test_a_deleted_copy_is_not_listed(store):
    mats = unit(np.random.default_rng(2).standard_normal((3, Q, D))).astype(np.float32)
    _fill(store, mats, {0: ["/photos/copy.jpg"]})
    hits = search_image(store, LoadedIndex.load(store.root, store), mats[0], k=1,
                        exists=lambda p: p != "/photos/copy.jpg").hits
    assert hits == [Hit(1, "/photos/00000.jpg", hits[0].score, hits[0].itc, None, ())]
