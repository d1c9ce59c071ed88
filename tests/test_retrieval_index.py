"""FAISS index choice, build/update, manifest, and search scores against a direct max-over-queries computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blip2cli.errors import UsageError
from blip2cli.retrieval import index as index_mod
from blip2cli.retrieval.index import LoadedIndex, choose_index, nlist_for, parse_index_key, update_index
from blip2cli.retrieval.rank import dedup, exact_search, image_scores, itc_scores, search_image, search_text
from blip2cli.retrieval.store import FileEntry, NewContent, Store, StoreInfo

Q, D = 4, 16


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(n: int, seed: int = 0, clusters: int = 20, noise: float = 0.6) -> np.ndarray:
    """(n, Q, D) unit query matrices: image = cluster centre + spread, queries = image + per-query noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, D))
    images = centres[rng.integers(clusters, size=n)] + 0.7 * rng.standard_normal((n, D))
    return unit(images[:, None] + noise * rng.standard_normal((n, Q, D))).astype(np.float32)


def fill(store: Store, mats: np.ndarray, start: int = 0) -> None:
    n = len(mats)
    shas = [f"sha{i}" for i in range(start, start + n)]
    store.commit(
        [NewContent(s, 1, 1) for s in shas],
        mats,
        [FileEntry(f"/photos/{i:05d}.jpg", 1, 1, s) for i, s in zip(range(start, start + n), shas)],
    )


def always(path: str) -> bool:
    return True


@pytest.fixture
def store(tmp_path):
    with Store.create(tmp_path, StoreInfo("fake", "fake-0", Q, D, rows_per_shard=64)) as s:
        yield s


@pytest.mark.parametrize(
    ("n", "layout", "factory"),
    [
        (1, "queries", "Flat"),
        (4095, "queries", "Flat"),
        (4096, "pooled", "IVF64,Flat"),
        (100_000, "pooled", "IVF1024,Flat"),
        (300_000, "pooled", "IVF2048,PQ2x4fs"),
        (1_000_000, "pooled", "IVF4096,PQ2x4fs"),
    ],
)
def test_index_type_is_chosen_by_collection_size(n, layout, factory):
    spec = choose_index(n, D)
    assert (spec.layout, spec.factory) == (layout, factory)
    assert choose_index(1_000_000, 256).factory == "IVF4096,PQ32x4fs"  # BLIP-2's 256-d: 16 bytes per image
    if layout == "pooled":
        assert spec.nprobe >= 8 and spec.rescore <= spec.refine


def test_nlist_keeps_39_training_points_per_list():
    assert nlist_for(4096) == 64  # 4*sqrt(n) = 256 would leave 16 points per list
    assert nlist_for(1_000_000) == 4096
    assert all(n / nlist_for(n) >= 39 for n in (50, 500, 5000, 50_000)) and nlist_for(10) == 1


def test_index_key_never_asks_for_polysemous_training():
    assert parse_index_key("IVF64,PQ8", 5000, D).factory == "IVF64,PQ8np"  # ecosystem §2.3: 12x slower build
    assert parse_index_key("pooled:IVF64,PQ8x4fs", 5000, D).factory == "IVF64,PQ8x4fs"
    assert parse_index_key("Flat", 10, D).layout == "queries"
    assert parse_index_key("pooled:Flat", 10, D).layout == "pooled"
    with pytest.raises(UsageError, match="faiss cannot build"):
        parse_index_key("IVF64,Nonsense", 10, D)


def test_text_search_scores_equal_direct_max_over_queries(store):
    mats = clustered(300)
    fill(store, mats)
    update_index(store, store.root)
    loaded = LoadedIndex.load(store.root, store)
    assert loaded.manifest.spec.factory == "Flat" and loaded.manifest.ntotal == 300 * Q
    text = unit(np.random.default_rng(5).standard_normal(D)).astype(np.float32)
    hits = search_text(store, loaded, text, k=10, exists=always).hits
    direct = (mats.astype(np.float16).astype(np.float32) @ text).max(axis=1)  # (n,): max over the Q queries
    order = np.argsort(-direct)[:10]
    assert [h.path for h in hits] == [f"/photos/{i:05d}.jpg" for i in order]
    np.testing.assert_allclose([h.itc for h in hits], direct[order], rtol=1e-5)
    assert all(h.score == h.itc and h.itm is None for h in hits)


def test_itm_rerank_score_is_itm_plus_itc(store):
    fill(store, clustered(50))
    update_index(store, store.root)
    loaded = LoadedIndex.load(store.root, store)
    text = unit(np.ones(D)).astype(np.float32)
    itm = {f"/photos/{i:05d}.jpg": float(i % 7) for i in range(50)}  # a fake ITM head
    result = search_text(
        store, loaded, text, k=5, rerank_k=20, itm_fn=lambda ps: np.array([itm[p] for p in ps]), exists=always
    )
    by_itc = search_text(store, loaded, text, k=20, exists=always).hits  # the 20 re-ranked candidates
    expected = sorted(((itm[h.path] + h.itc, h.path) for h in by_itc), reverse=True)[:5]
    assert [h.path for h in result.hits] == [p for _, p in expected]
    assert [h.score for h in result.hits] == pytest.approx([s for s, _ in expected])
    assert all(h.score == pytest.approx(h.itm + h.itc) for h in result.hits)


def test_image_to_image_rule_is_symmetric_mean_of_max():
    a, b = clustered(2, seed=3)
    assert image_scores(a[None], a)[0] == pytest.approx(1.0, abs=1e-6)
    assert image_scores(a[None], b)[0] == pytest.approx(image_scores(b[None], a)[0], abs=1e-6)
    sims = a @ b.T  # (Q, Q)
    assert image_scores(a[None], b)[0] == pytest.approx((sims.max(1).mean() + sims.max(0).mean()) / 2, abs=1e-6)
    assert itc_scores(a[None], b[0])[0] == pytest.approx((a @ b[0]).max(), abs=1e-6)


def test_image_search_finds_the_image_itself_first(store):
    mats = clustered(100)
    fill(store, mats)
    update_index(store, store.root)
    hits = search_image(store, LoadedIndex.load(store.root, store), mats[17], k=3, exists=always).hits
    assert hits[0].path == "/photos/00017.jpg" and hits[0].score == pytest.approx(1.0, abs=2e-3)


def test_pooled_ivf_finds_the_exact_top_10_and_updates_in_place(store):
    mats = clustered(3000, clusters=40, noise=0.3)  # the 16-d stand-in needs queries closer to their mean
    fill(store, mats)
    manifest = update_index(store, store.root, "pooled:IVF16,Flat")
    assert manifest.spec.layout == "pooled" and manifest.spec.chosen_by == "user"
    assert manifest.measured["recall_at_10"] >= 0.95 and manifest.measured["p50_ms"] > 0
    loaded = LoadedIndex.load(store.root, store)
    texts = unit(mats[[5, 50, 500], 1] + 0.1)
    truth, _ = exact_search(store, texts, 10)
    for text, rows in zip(texts, truth):
        hits = search_text(store, loaded, text, k=10, exists=always).hits
        assert len({h.path for h in hits} & {f"/photos/{r:05d}.jpg" for r in rows}) >= 9

    store.commit(remove=[f"/photos/{i:05d}.jpg" for i in range(100)])  # drop 100, add 50: no retraining
    fill(store, clustered(50, seed=9), start=3000)
    updated = update_index(store, store.root)  # the user's key is kept across runs
    assert updated.spec == manifest.spec and updated.count == 2950 and updated.measured == manifest.measured
    loaded = LoadedIndex.load(store.root, store)
    assert loaded.index.ntotal == 2950 and np.array_equal(loaded.rows, store.live_rows())
    import faiss

    faiss.extract_index_ivf(loaded.index).nprobe = 16  # visit every list: all ids come back
    rows = loaded.candidates(texts[:1], 3000)
    assert not set(rows.tolist()) & set(range(100)) and set(range(3000, 3050)) <= set(rows.tolist())


def test_index_is_rebuilt_when_the_size_class_changes(store, monkeypatch):
    monkeypatch.setattr(index_mod, "EXACT_MAX_IMAGES", 100)
    fill(store, clustered(99))
    assert update_index(store, store.root).spec.layout == "queries"
    fill(store, clustered(2000, seed=1), start=99)
    rebuilt = update_index(store, store.root)
    assert (rebuilt.spec.layout, rebuilt.spec.factory) == ("pooled", f"IVF{nlist_for(2099)},Flat")
    assert rebuilt.count == 2099 and rebuilt.ntotal == 2099


def test_manifest_describes_the_index_and_old_files_are_removed(store):
    fill(store, clustered(20))
    first = update_index(store, store.root)
    assert update_index(store, store.root) == first  # up to date: nothing rewritten
    fill(store, clustered(5, seed=2), start=20)
    (store.root / ".index.json.tmp").write_text("{")  # what a kill mid-write leaves
    second = update_index(store, store.root)
    raw = json.loads((store.root / "index.json").read_text())
    assert raw["spec"]["factory"] == "Flat" and raw["metric"] == "inner_product" and raw["dim"] == D
    assert (raw["count"], raw["ntotal"], raw["model"], raw["fingerprint"]) == (25, 25 * Q, "fake", "fake-0")
    assert raw["faiss_version"] and raw["measured"]["recall_at_10"] == 1.0 and "p99_ms" in raw["measured"]
    assert raw["generation"] == store.generation
    left = sorted(p.name for p in store.root.iterdir() if p.name.startswith(("index", "rows", ".index")))
    assert left == sorted(["index.json", second.file, second.rows_file])


def test_stale_index_and_deleted_files_are_skipped(store):
    fill(store, clustered(30))
    update_index(store, store.root)
    loaded = LoadedIndex.load(store.root, store)
    text = unit(np.ones(D)).astype(np.float32)
    best = search_text(store, loaded, text, k=3, exists=always).hits
    gone = {best[0].path}
    result = search_text(store, loaded, text, k=3, exists=lambda p: p not in gone)
    assert result.skipped == [best[0].path]
    assert [h.path for h in result.hits] == [h.path for h in best[1:]] + [result.hits[2].path]
    assert [h.rank for h in result.hits] == [1, 2, 3]
    store.commit(remove=[best[1].path])  # store moves on, index not refreshed (an interrupted run)
    assert loaded.stale
    assert best[1].path not in [h.path for h in search_text(store, loaded, text, k=3, exists=always).hits]


def test_search_refuses_another_models_vectors(store):
    with pytest.raises(UsageError, match="built with model 'fake'.*use --model fake"):
        store.check_model("other", "other-weights")
    store.check_model("renamed-but-same-weights", "fake-0")  # same fingerprint: fine


def test_dedup_keeps_the_best_of_near_duplicates(store):
    mats = clustered(10)
    mats[1] = unit(mats[0] + 0.01)  # a re-encoded copy of image 0: different bytes, same picture
    fill(store, mats)
    update_index(store, store.root)
    hits = search_image(store, LoadedIndex.load(store.root, store), mats[0], k=5, exists=always).hits
    assert {h.path for h in hits[:2]} == {"/photos/00000.jpg", "/photos/00001.jpg"}
    kept = dedup(store, hits, threshold=0.94)
    assert [h.path for h in kept] == [hits[0].path] + [h.path for h in hits[2:]]
    assert [h.rank for h in kept] == [1, 2, 3, 4]
