"""Search latency, recall and memory of `blip2 search` at scale, on synthetic ITC-shaped embeddings.

    python benchmarks/search_latency.py              # 1,000,000 images (~16.4 GB of float16 matrices on disk)
    python benchmarks/search_latency.py --n 20000    # a quick run

Every image gets 32 unit query vectors in 256-d, as BLIP-2's ITC does. The data are clustered: an image's content
is a point of a 64-d latent mixture (one cluster per 1,000 images) projected to 256-d; each of its 32 queries adds
a per-slot direction shared by all images (BLIP-2's queries specialise) and its own noise. Measured shape: mean
cosine between two queries of one image ~0.67, between a query and the pooled vector ~0.82 (printed below).
Queries: half "text-like" (one query vector of a random image plus noise: the text matches one aspect, which
max-over-queries rewards and the pooled vector blurs), half "concept" (a cluster centre plus noise).

Design under test (blip2cli/retrieval/index.py): one pooled vector per image in FAISS (IVF + PQ fast-scan past
262k images), then the best `refine` candidates re-ranked by their exact pooled vector from the store, then the
best `rescore` scored exactly by max over their 32 stored query vectors. The alternative, all 32 vectors per image
in FAISS, is 32x the rows: at 1M images 32.8 GB as float32 Flat, ~0.8 GB as PQ32x4fs + ids, and every query
must fetch k*32 rows. Exact ground truth is the brute-force max over queries over all images, computed while the
data are generated. Latency is per single query, without ITM re-ranking: "cold" after evicting the store's files
from the page cache (the 16 GB of matrices do not stay cached on a 24 GB machine), "default" the same queries again
(cached). Memory is measured in a fresh process that only loads the index and searches (RSS split into anonymous
memory and touched file pages, which are page cache and reclaimable).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2cli.retrieval import index as index_mod
from blip2cli.retrieval.store import FileEntry, NewContent, Store, StoreInfo

Q, DIM, LATENT = 32, 256, 64
CHUNK = 8192


class Synthetic:
    """Deterministic clustered ITC-like query matrices, generated chunk by chunk with torch (fast on CPU)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        import torch

        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        self.clusters = max(10, n // 1000)
        self.proj = torch.linalg.qr(torch.randn(DIM, LATENT, generator=g))[0].T.contiguous()  # (L, D)
        self.centres = torch.randn(self.clusters, LATENT, generator=g)
        slots = torch.randn(Q, DIM, generator=g)
        self.slots = slots / slots.norm(dim=-1, keepdim=True)

    def images(self, start: int, n: int):
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + start + 1)
        cluster = torch.randint(self.clusters, (n,), generator=g)
        z = self.centres[cluster] + 0.6 * torch.randn(n, LATENT, generator=g)  # (n, L)
        x = torch.nn.functional.normalize(z @ self.proj, dim=-1)  # (n, D): the picture
        m = x[:, None] + 0.5 * self.slots[None] + 0.5 * torch.randn(n, Q, DIM, generator=g) / math.sqrt(DIM)
        return torch.nn.functional.normalize(m, dim=-1)  # (n, Q, D)

    def queries(self, count: int) -> np.ndarray:
        import torch

        g = torch.Generator().manual_seed(self.seed + 7)
        first = self.images(0, CHUNK)
        half = count // 2
        picked = first[torch.randint(CHUNK, (half,), generator=g), torch.randint(Q, (half,), generator=g)]
        concept = self.centres[torch.randint(self.clusters, (count - half,), generator=g)] @ self.proj
        concept = torch.nn.functional.normalize(concept, dim=-1)
        t = torch.cat([picked, concept]) + 0.5 * torch.randn(count, DIM, generator=g) / math.sqrt(DIM)
        return torch.nn.functional.normalize(t, dim=-1).numpy()


def build(n: int, folder: Path, n_queries: int, key: str | None) -> dict:
    import torch

    gen = Synthetic(n)
    texts = gen.queries(n_queries)
    t_texts = torch.from_numpy(texts)
    best = np.full((n_queries, 10), -np.inf, dtype=np.float32)
    best_rows = np.zeros((n_queries, 10), dtype=np.int64)
    start = time.perf_counter()
    with Store.create(folder, StoreInfo("synthetic", "synthetic-v1", Q, DIM)) as store:
        for lo in range(0, n, CHUNK):
            m = min(CHUNK, n - lo)
            mats = gen.images(lo, m)  # (m, Q, D) float32
            half = mats.half()
            scores = (half.float().reshape(-1, DIM) @ t_texts.T).reshape(m, Q, -1).amax(dim=1).T.numpy()  # (T, m)
            both = np.concatenate([best, scores], axis=1)
            top = np.argpartition(-both, 9, axis=1)[:, :10]
            rows = np.concatenate([best_rows, np.broadcast_to(np.arange(lo, lo + m), scores.shape)], axis=1)
            best, best_rows = np.take_along_axis(both, top, 1), np.take_along_axis(rows, top, 1)
            shas = [f"syn{i:08d}" for i in range(lo, lo + m)]
            store.commit(
                [NewContent(s, 224, 224) for s in shas],
                half.numpy(),
                [FileEntry(f"/synthetic/{i:08d}.jpg", 1, 1, s) for i, s in zip(range(lo, lo + m), shas)],
            )
            if lo % (16 * CHUNK) == 0:
                print(f"  generated {lo + m:,}/{n:,} images ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
        generate_s = time.perf_counter() - start
        sample = store.queries(np.arange(min(n, 2000))).astype(np.float32)
        intra = float(np.mean([(s @ s.T)[np.triu_indices(Q, 1)].mean() for s in sample[:500]]))
        pooled = store.pooled(np.arange(min(n, 2000))).astype(np.float32)
        to_pool = float(np.einsum("nqd,nd->nq", sample, pooled).mean())
        start = time.perf_counter()
        manifest = index_mod.update_index(store, folder, key)
        build_s = time.perf_counter() - start
    np.save(folder / "bench_queries.npy", texts)
    np.save(folder / "bench_truth.npy", best_rows)
    return {
        "n": n,
        "generate_and_store_s": round(generate_s, 1),
        "build_s": round(build_s, 1),
        "faiss_build_s": manifest.build_seconds,
        "factory": manifest.spec.factory,
        "layout": manifest.spec.layout,
        "query_cosine_within_image": round(intra, 3),
        "query_to_pooled_cosine": round(to_pool, 3),
        "index_file_mb": round((folder / manifest.file).stat().st_size / 2**20, 1),
        "rows_file_mb": round((folder / manifest.rows_file).stat().st_size / 2**20, 1),
        "store_gb": round(sum(p.stat().st_size for p in (folder / "vectors").iterdir()) / 2**30, 2),
    }


def _rss() -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile", "VmHWM") if k in fields}


def _evict(vectors: Path) -> None:
    """Drop this store's pages from the page cache (its own files only; they are clean, so nothing is lost)."""
    for path in vectors.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def search(folder: Path) -> dict:
    from blip2cli.retrieval.rank import itc_scores

    texts = np.load(folder / "bench_queries.npy")
    truth = np.load(folder / "bench_truth.npy")
    before = _rss()
    store = Store.open(folder)
    loaded = index_mod.LoadedIndex.load(folder, store)
    itc_scores(store.queries(np.arange(2)), texts[0])  # import torch now, not inside the first timed query
    after_load = _rss()
    spec = loaded.manifest.spec

    def run(nprobe: int, rescore: int, refine: int) -> dict:
        import faiss

        ivf = faiss.try_extract_index_ivf(loaded.index)
        if ivf is not None:
            ivf.nprobe = nprobe
        loaded.manifest.spec = index_mod.IndexSpec(spec.layout, spec.factory, nprobe, refine, rescore)
        times, recall = [], []
        for i, t in enumerate(np.concatenate([texts[:5], texts])):  # 5 warm-up queries
            start = time.perf_counter()
            rows = loaded.candidates(t[None], 10)
            scores = itc_scores(store.queries(rows), t)
            top = rows[np.argsort(-scores)[:10]]
            elapsed = time.perf_counter() - start
            if i >= 5:
                times.append(elapsed)
                recall.append(len(set(top.tolist()) & set(truth[i - 5].tolist())) / 10)
        half = len(texts) // 2
        return {
            "nprobe": nprobe,
            "refine": refine,
            "rescore": rescore,
            "p50_ms": round(float(np.percentile(times, 50)) * 1e3, 2),
            "p99_ms": round(float(np.percentile(times, 99)) * 1e3, 2),
            "recall_at_10": round(float(np.mean(recall)), 4),
            "recall_text_like": round(float(np.mean(recall[:half])), 4),
            "recall_concept": round(float(np.mean(recall[half:])), 4),
        }

    _evict(folder / "vectors")  # the first pass reads the store from disk, as a first search after boot would
    cold = run(spec.nprobe, spec.rescore, spec.refine)
    default = run(spec.nprobe, spec.rescore, spec.refine)  # the same queries again: their rows are now cached
    sweep = []
    if spec.layout == "pooled":
        for nprobe, rescore, refine in (
            (spec.nprobe // 2, spec.rescore, spec.refine),
            (spec.nprobe, 100, spec.refine),
            (spec.nprobe, 1000, spec.refine),
            (spec.nprobe, spec.rescore, 3 * spec.refine),
            (spec.nprobe * 2, spec.rescore, spec.refine),
        ):
            sweep.append(run(max(1, nprobe), rescore, refine))
    return {
        "cold": cold,
        "default": default,
        "sweep": sweep,
        "rss_mb_before_load": before,
        "rss_mb_after_load": after_load,
        "rss_mb_after_queries": _rss(),
        "manifest_measured": loaded.manifest.measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="images (each 32 x 256 query vectors)")
    parser.add_argument("--queries", type=int, default=100, help="search queries (half text-like, half concept)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--index-key", default=None, help="override the automatic index choice")
    parser.add_argument("--phase", choices=["all", "search"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "search":
        print(json.dumps(search(args.dir)))
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="blip2-search-bench-"))
    try:
        built = build(args.n, folder, args.queries, args.index_key)
        out = subprocess.run(
            [sys.executable, __file__, "--phase", "search", "--dir", str(folder)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout  # a fresh process: clean RSS
        searched = json.loads(out.strip().splitlines()[-1])
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    result = {"machine": f"{os.cpu_count()} cpu", **built, **searched}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
