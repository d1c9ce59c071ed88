"""The FAISS index over the store: which index for how many images, building or updating it, loading it to search.

Two layouts (ecosystem §2.4):
- `queries`: all Q query vectors of every image, faiss id = row * Q + q. An exact `Flat` index gives ITC exactly:
  the first `want` distinct images in the row ranking are the top `want` by max over queries.
- `pooled`: one vector per image (the re-normalised mean of its queries), faiss id = row. Search is a cascade:
  faiss proposes `refine` images, their exact pooled vectors (read from the store) keep `rescore`, and those are
  scored exactly by max over queries (rank.py). Only the first two stages are approximate; the benchmark and the
  manifest's `measured` block say how much that costs in recall.

Choice by size, after autofaiss (ecosystem §2.2) but counted in images:

    images < 4,096        queries  Flat                     exact; <= 131k rows, ~134 MB float32
    images < 262,144      pooled   IVF{nlist},Flat          1 KB per image
    otherwise             pooled   IVF{nlist},PQ{D/8}x4fs   16 B per image; fast-scan, never polysemous training

nlist is the power of two nearest 4*sqrt(n), clamped to >= 39 training points per list; it changes (and the index
is retrained) when the collection grows about 4x. Smaller changes update the index in place (remove + add by id).
The manifest `index.json` is the commit point: index files get fresh names, then the manifest is replaced.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from blip2cli.errors import UsageError
from blip2cli.files import atomic_write
from blip2cli.retrieval.scores import exact_search, itc_scores
from blip2cli.retrieval.store import Store, pool

EXACT_MAX_IMAGES = 4096
IVF_FLAT_MAX_IMAGES = 1 << 18
REFINE = 1000  # pooled: images faiss proposes, re-ranked by their exact pooled vector
RESCORE = 300  # pooled: images scored exactly by max over queries (3.2 ms on 2 cores, see benchmarks/)
MEASURE_QUERIES = 32
MEASURE_EXACT_MAX_IMAGES = 65536  # recall is measured against a full exact scan up to here (1 GB of float16)
MANIFEST = "index.json"


@dataclass(frozen=True)
class IndexSpec:
    layout: Literal["queries", "pooled"]
    factory: str  # faiss index_factory string
    nprobe: int = 0  # IVF lists visited per query; 0 when not IVF
    refine: int = 0  # pooled: images faiss proposes
    rescore: int = 0  # pooled: images kept for exact max-over-queries scoring
    chosen_by: Literal["auto", "user"] = "auto"


@dataclass
class Manifest:
    """What `index.json` holds: enough to load, check and describe the index without anything else."""

    generation: int  # the store generation this index reflects
    file: str  # the faiss file, relative to the index folder
    rows_file: str  # .npy of the store rows the faiss file holds (int64, ascending)
    spec: IndexSpec
    metric: str
    dim: int
    num_queries: int
    count: int  # images
    ntotal: int  # faiss vectors
    model: str
    fingerprint: str
    faiss_version: str
    build_seconds: float
    measured: dict[str, Any] = field(default_factory=dict)  # recall_at_10, p50_ms, p99_ms, queries, what
    format: int = 1

    @classmethod
    def read(cls, index_dir: Path) -> Manifest | None:
        path = Path(index_dir) / MANIFEST
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        raw["spec"] = IndexSpec(**raw["spec"])
        return cls(**raw)

    def write(self, index_dir: Path) -> None:
        text = json.dumps(asdict(self), indent=2) + "\n"
        atomic_write(Path(index_dir) / MANIFEST, lambda f: f.write(text.encode()))


def nlist_for(n: int) -> int:
    """Power of two nearest 4*sqrt(n), with at least 39 training points per list (faiss warns below)."""
    target = 1 << max(0, round(math.log2(max(4 * math.sqrt(max(n, 1)), 1))))
    while target > 1 and n / target < 39:
        target //= 2
    return target


def choose_index(n_images: int, dim: int) -> IndexSpec:
    """The index for a collection of `n_images` (see the module docstring for the table)."""
    if n_images < EXACT_MAX_IMAGES:
        return IndexSpec("queries", "Flat")
    nlist = nlist_for(n_images)
    nprobe = min(nlist, max(32, nlist // 16))  # benchmarks/search_latency.py: fewer probes cost recall
    if n_images < IVF_FLAT_MAX_IMAGES:
        return IndexSpec("pooled", f"IVF{nlist},Flat", nprobe, REFINE, RESCORE)
    return IndexSpec("pooled", f"IVF{nlist},PQ{max(dim // 8, 1)}x4fs", nprobe, REFINE, RESCORE)


def parse_index_key(key: str, n_images: int, dim: int) -> IndexSpec:
    """`auto`, or `[queries:|pooled:]FACTORY` (default layout: pooled, except a bare `Flat`: queries, exact)."""
    if key == "auto":
        return choose_index(n_images, dim)
    layout, _, factory = key.rpartition(":")
    if layout not in ("", "queries", "pooled"):
        raise UsageError(f"--index-key: unknown layout '{layout}' (use queries: or pooled:)")
    layout = layout or ("queries" if factory == "Flat" else "pooled")
    # BLIP-2 pitfall (ecosystem §2.3): `PQm` alone turns on polysemous training, 12x slower for the same index.
    fixed = re.sub(r"(PQ\d+(?:x8)?)(?=,|$)", r"\1np", factory)
    try:
        import faiss

        probe = faiss.index_factory(dim, fixed, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise UsageError(f"--index-key: faiss cannot build '{factory}': {str(exc).splitlines()[-1]}") from None
    ivf = faiss.try_extract_index_ivf(probe)
    nprobe = min(ivf.nlist, max(32, ivf.nlist // 16)) if ivf is not None else 0
    pooled = layout == "pooled"
    return IndexSpec(layout, fixed, nprobe, REFINE if pooled else 0, RESCORE if pooled else 0, "user")


def resolve_spec(key: str | None, previous: Manifest | None, n_images: int, dim: int) -> IndexSpec:
    """--index-key if given; else the key a user chose earlier (kept across reruns); else the automatic choice."""
    if key is None and previous is not None and previous.spec.chosen_by == "user":
        return previous.spec
    return parse_index_key(key or "auto", n_images, dim)


def update_index(store: Store, index_dir: Path, key: str | None = None, measure: bool = True) -> Manifest:
    """Bring the index in line with the store: nothing if current, in-place remove/add when the spec is unchanged
    and the layout is pooled, else a rebuild from stored vectors. Safe to kill at any point."""
    import faiss

    index_dir = Path(index_dir)
    old = Manifest.read(index_dir)
    live = store.live_rows()
    spec = resolve_spec(key, old, len(live), store.info.dim)
    same_model = old is not None and old.fingerprint == store.info.fingerprint
    if same_model and old.spec == spec and old.generation == store.generation and old.count == len(live):
        return old
    start = time.perf_counter()
    rebuilt = not (same_model and old.spec == spec and spec.layout == "pooled")
    if not rebuilt:
        index, rows = _update(store, index_dir, old, live)
    else:
        index, rows = _build(store, spec, live)
    build_seconds = time.perf_counter() - start
    token = f"{store.generation:08d}-{secrets.token_hex(4)}"
    manifest = Manifest(
        generation=store.generation,
        file=f"index-{token}.faiss",
        rows_file=f"rows-{token}.npy",
        spec=spec,
        metric="inner_product",
        dim=store.info.dim,
        num_queries=store.info.num_queries,
        count=len(rows),
        ntotal=int(index.ntotal),
        model=store.info.model,
        fingerprint=store.info.fingerprint,
        faiss_version=faiss.__version__,
        build_seconds=round(build_seconds, 3),
    )
    if rebuilt and measure and len(rows):
        manifest.measured = measure_index(store, LoadedIndex(manifest, index, rows, store))
    elif not rebuilt:
        manifest.measured = old.measured  # an in-place update keeps the figures measured at the last rebuild
    try:
        atomic_write(index_dir / manifest.rows_file, lambda f: np.save(f, rows), rows.nbytes)
        needed = int(index.ntotal) * store.info.dim * 4  # at most float32 vectors (a Flat index)
        atomic_write(index_dir / manifest.file, lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)),
                     needed)  # fmt: skip
        manifest.write(index_dir)  # the commit point
    except BaseException:  # e.g. a full disk: the previous index (and its manifest) stay as they were
        _remove_unreferenced(index_dir, old)
        raise
    _remove_unreferenced(index_dir, manifest)
    return manifest


def _build(store: Store, spec: IndexSpec, live: np.ndarray) -> tuple[Any, np.ndarray]:
    import faiss

    dim, q = store.info.dim, store.info.num_queries
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if faiss.try_extract_index_ivf(index) is None:
        index = faiss.IndexIDMap2(index)  # Flat/HNSW take ids through a map
    if not index.is_trained and len(live):
        nlist = faiss.extract_index_ivf(index).nlist
        sample = np.sort(np.random.default_rng(0).choice(live, size=min(len(live), 40 * nlist), replace=False))
        vectors = store.pooled(sample) if spec.layout == "pooled" else _first_queries(store, sample)
        index.train(np.ascontiguousarray(vectors, dtype=np.float32))
    for rows, vecs in store.iter_live("pooled" if spec.layout == "pooled" else "query", chunk=16384):
        if spec.layout == "pooled":
            index.add_with_ids(vecs.astype(np.float32), rows)
        else:
            ids = (rows[:, None] * q + np.arange(q)).reshape(-1)  # row * Q + q
            index.add_with_ids(vecs.reshape(-1, dim).astype(np.float32), ids)
    return index, live


def _first_queries(store: Store, rows: np.ndarray) -> np.ndarray:
    """Training vectors for an IVF over query rows: every query vector of a sample of images, capped."""
    mats = store.queries(rows[: max(1, len(rows) // store.info.num_queries)])
    return mats.reshape(-1, store.info.dim)


def _update(store: Store, index_dir: Path, old: Manifest, live: np.ndarray) -> tuple[Any, np.ndarray]:
    import faiss

    index = read_faiss(index_dir / old.file)
    had = np.load(index_dir / old.rows_file)
    gone = np.setdiff1d(had, live, assume_unique=True)
    new = np.setdiff1d(live, had, assume_unique=True)
    if len(gone):
        index.remove_ids(faiss.IDSelectorBatch(gone))
    for i in range(0, len(new), 16384):
        index.add_with_ids(store.pooled(new[i : i + 16384]).astype(np.float32), new[i : i + 16384])
    return index, live


class LoadedIndex:
    """A faiss index plus the store it was built from; `candidates` is the approximate half of search."""

    def __init__(self, manifest: Manifest, index: Any, rows: np.ndarray, store: Store) -> None:
        import faiss

        self.manifest, self.index, self.rows, self.store = manifest, index, rows, store
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = manifest.spec.nprobe

    @classmethod
    def load(cls, index_dir: Path, store: Store) -> LoadedIndex:
        for attempt in range(3):  # a concurrent `blip2 index` may replace the files between our two reads
            manifest = Manifest.read(index_dir)
            if manifest is None:
                raise UsageError(f"{index_dir}: no index.json; run `blip2 index PHOTOS --index {index_dir}` first")
            try:
                index = read_faiss(Path(index_dir) / manifest.file)
                return cls(manifest, index, np.load(Path(index_dir) / manifest.rows_file), store)
            except (RuntimeError, FileNotFoundError):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    @property
    def stale(self) -> bool:
        """True when the store changed after this index was written (an interrupted `blip2 index`)."""
        return self.manifest.generation != self.store.generation

    def candidates(self, vectors: np.ndarray, want: int) -> np.ndarray:
        """Store rows worth scoring exactly for query vectors (M, D): at least `want` when the index has them.

        queries layout: per vector, the first `want` distinct images of the row ranking (exact for M = 1);
        pooled layout: faiss -> exact pooled re-rank -> the best max(rescore, want), for the pooled query vector."""
        n = self.index.ntotal
        if n == 0 or want <= 0:
            return np.empty(0, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.manifest.dim)
        spec, q = self.manifest.spec, self.manifest.num_queries
        if spec.layout == "queries":
            _, ids = self.index.search(vectors, min(n, want * q))
            found = [_first_distinct(row_ids[row_ids >= 0] // q, want) for row_ids in ids]
            return np.unique(np.concatenate(found))
        if len(vectors) > 1:
            vectors = pool(vectors[None])  # an image query: its pooled vector
        _, ids = self.index.search(vectors, min(n, max(spec.refine, 2 * want)))
        rows = ids[0][ids[0] >= 0]
        keep = max(spec.rescore, want)
        if len(rows) > keep:  # exact pooled re-rank from the store: 512 B per image
            scores = self.store.pooled(rows).astype(np.float32) @ vectors[0]
            rows = rows[np.argsort(-scores, kind="stable")[:keep]]
        return rows


def _first_distinct(rows: np.ndarray, want: int) -> np.ndarray:
    _, first = np.unique(rows, return_index=True)
    return rows[np.sort(first)][:want]


def measure_index(store: Store, loaded: LoadedIndex, n_queries: int = MEASURE_QUERIES) -> dict[str, Any]:
    """Latency (candidates + exact re-score, no ITM) and, up to 65k images, recall@10 against a full exact scan,
    on pseudo-text queries: a random stored query vector plus noise (real captions are not available here)."""
    rng = np.random.default_rng(0)
    live = loaded.rows
    picked = rng.choice(live, size=n_queries, replace=len(live) < n_queries)
    slots = rng.integers(0, store.info.num_queries, n_queries)
    vecs = store.queries(picked).astype(np.float32)[np.arange(n_queries), slots]  # (n_queries, D)
    noise = rng.standard_normal(vecs.shape).astype(np.float32) / math.sqrt(store.info.dim)
    texts = vecs + 0.5 * noise
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    k = min(10, len(live))
    got, times = [], []
    for t in texts:
        start = time.perf_counter()
        rows = loaded.candidates(t[None], k)
        scores = itc_scores(store.queries(rows), t)
        got.append(rows[np.argsort(-scores, kind="stable")[:k]])
        times.append(time.perf_counter() - start)
    out: dict[str, Any] = {
        "queries": n_queries,
        "p50_ms": round(float(np.percentile(times, 50)) * 1e3, 3),
        "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 3),
        "recall_at_10": None,
        "what": "pseudo-text queries; latency = candidates + exact re-score, no ITM",
    }
    if len(live) <= MEASURE_EXACT_MAX_IMAGES:
        truth, _ = exact_search(store, texts, k)
        out["recall_at_10"] = round(float(np.mean([len(set(g) & set(t)) / k for g, t in zip(got, truth)])), 4)
    return out


def read_faiss(path: Path) -> Any:
    """faiss.read_index through a Python file: faiss takes only UTF-8 names (not `caf\\xe9/`)."""
    import faiss

    with open(path, "rb") as f:
        return faiss.read_index(faiss.PyCallbackIOReader(f.read))


def _remove_unreferenced(index_dir: Path, manifest: Manifest | None) -> None:
    keep = {manifest.file, manifest.rows_file} if manifest is not None else set()
    for path in [*index_dir.glob("index-*.faiss"), *index_dir.glob("rows-*.npy"), *index_dir.glob(".*.tmp")]:
        if path.name not in keep:
            path.unlink(missing_ok=True)
