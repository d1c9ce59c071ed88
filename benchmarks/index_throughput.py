"""Indexing throughput: `blip2 index` end to end against the model's pure forward speed, in the same run.

The model is BLIP-2's retrieval layout at reduced width, with random weights (no download): a ViT-B/16-like encoder
(width 768, depth 12, heads 12, patch 16, 224 px) and a BERT-base Q-Former with 32 queries and 256-d ITC
projections, a `Blip2ForImageTextRetrieval` saved once with `save_pretrained` under .bench/ (with the test BERT
tokenizer) and loaded with `load_model`, as `blip2 index --model DIR` would.

  forward  ViT -> ln_vision -> Q-Former -> ITC projection on pixels already decoded and pre-processed, in batches
           of --batch-size (`vision_embeds` + `image_features`, what `ModelEncoder.embed` runs)
  index    `blip2cli.retrieval.indexer.index_images` with the real `ModelEncoder` from the JPEG files into a fresh
           index folder: stat + sha256, decode + resize in the worker threads, embed, SQLite + vector shards,
           FAISS index + manifest (with its recall/latency measurement). The model is loaded once, before.
Runs alternate (forward, index, index, forward, ...); medians are reported. ratio = index img/s / forward img/s:
1.0 means decoding, hashing and writing are completely hidden behind the model. Also, per image called serially:
sha256, JPEG decode, resize + normalise; and where the index runs' time went (model, store commits, FAISS build, the
rest: waiting for decoded images, the file diff). The stored vectors must equal the pure forward's.

OpenMP threads wait passively by default here (--omp-wait-policy). On a shared, oversubscribed CPU, libgomp's own
spin-then-sleep burns CPU at every barrier of the pure forward (measured: 5.0-7.5 CPU s instead of 4.5 for one
batch of 16 at load 3.6 on 2 cores), while in the index run the decode threads' OpenMP teams (more threads than
cores) switch libgomp to short spins: with its default the forward is the slower of the two and the ratio > 1.

    .venv/bin/python benchmarks/index_throughput.py                 # 48 photos, batch 16, 4 repeats (~5 min)
    .venv/bin/python benchmarks/index_throughput.py --images 32 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

Q = 32  # query tokens
VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6, "qkv_bias": True}  # fmt: skip
QFORMER = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
           "cross_attention_frequency": 2, "encoder_hidden_size": 768, "use_qformer_text_input": True}  # fmt: skip


def build(out: Path) -> Path:
    """Save the random mid-size retrieval BLIP-2 once (about 0.8 GB in fp32)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from common import random_init
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig

    from blip2cli import tiny

    out.mkdir(parents=True, exist_ok=True)
    tok = tiny.bert_tokenizer(out)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**VISION).to_dict(),
        qformer_config=Blip2QFormerConfig(vocab_size=len(tok), **QFORMER).to_dict(),
        num_query_tokens=Q, image_text_hidden_size=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(config)
    random_init(model)
    model.save_pretrained(out)
    return out


def photos(n: int, cache: Path) -> tuple[list[Path], str]:
    """The first n coco-mini photos, else generated JPEGs of a few sizes (smooth colour fields plus grain)."""
    coco = ROOT.parent / "shared" / "data" / "coco-mini"
    found = sorted(coco.rglob("*.jpg"), key=str)[:n] if coco.is_dir() else []
    if len(found) == n:
        return found, f"coco-mini ({coco})"
    import torch
    from PIL import Image

    folder = cache / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    sizes = [(640, 480), (480, 640), (1024, 768), (500, 375), (1600, 1200)]
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        if not path.is_file():
            w, h = sizes[i % len(sizes)]
            field = torch.nn.functional.interpolate(torch.rand(1, 3, h // 32, w // 32, generator=g), (h, w),
                                                    mode="bilinear")[0]  # fmt: skip
            img = (field + 0.08 * torch.randn(3, h, w, generator=g)).clamp(0, 1).mul(255).to(torch.uint8)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, quality=90)
        paths.append(path)
    return paths, f"generated JPEGs ({folder})"


def per_image_ms(fn: Callable[[Path], object], files: list[Path]) -> str:
    """Mean milliseconds of fn per file, called serially: wall clock / CPU time of the whole process."""
    t, cpu = time.perf_counter(), time.process_time()
    for f in files:
        fn(f)
    return f"{1e3 * (time.perf_counter() - t) / len(files):.1f}/{1e3 * (time.process_time() - cpu) / len(files):.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (both measurements)")
    parser.add_argument("--repeats", type=int, default=4, help="timed runs of each measurement, alternated")
    parser.add_argument("--workers", type=int, default=4, help="decode threads (blip2 index --workers; default 4)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--omp-wait-policy", choices=["passive", "active", "default"], default="passive",
                        help="OMP_WAIT_POLICY for torch's threads; default: libgomp's own (see above)")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=ROOT / ".bench" / "blip2-itm-mid")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # read once, when torch loads libgomp
    import torch

    from blip2cli.data.images import load_image
    from blip2cli.model.load import load_model
    from blip2cli.retrieval import index as index_mod
    from blip2cli.retrieval.indexer import ModelEncoder, index_images
    from blip2cli.retrieval.store import Store, sha256_file

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    path = build(args.cache)
    t_load = time.perf_counter()
    model = load_model(str(path), "cpu", "float32")
    t_load = time.perf_counter() - t_load
    files, source = photos(args.images, args.cache)
    bs = args.batch_size

    # Where the index runs' time goes: the library's own calls, timed in place (perf_counter only).
    spent = {"embed": 0.0, "commit": 0.0, "faiss": 0.0}

    def timed(key: str, fn: Callable) -> Callable:
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t

        return wrapper

    class TimedEncoder(ModelEncoder):
        embed = timed("embed", ModelEncoder.embed)

    Store.commit = timed("commit", Store.commit)
    index_mod.update_index = timed("faiss", index_mod.update_index)
    enc = TimedEncoder(model, bs)

    pixels = torch.stack([enc.prepare(load_image(f)) for f in files])  # (n, 3, 224, 224): decoded once, up front
    print(f"setup {time.perf_counter() - t0:.0f} s (model load {t_load:.1f} s); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters; {len(files)} images from {source}; "
          f"batch {bs}, {args.workers} decode workers, fp32, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}", flush=True)  # fmt: skip

    def forward() -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([
                model.image_features(model.vision_embeds(pixels[i : i + bs])).float().cpu().numpy()  # (B, Q, D)
                for i in range(0, len(pixels), bs)
            ])  # fmt: skip

    def stored(folder: Path) -> np.ndarray:
        """The index's query matrices, in the order of `files`: (n, Q, D) float16."""
        with Store.open(folder) as store:
            shas, rows = store.files(), store.contents()
            return store.queries(np.array([rows[shas[str(f.resolve())].sha256][0] for f in files]))

    work = Path(tempfile.mkdtemp(prefix="blip2-index-bench-", dir=args.cache))

    def index(folder: Path, paths: list[Path]) -> None:
        report = index_images(paths, folder, lambda name: enc, model=str(path), batch_size=bs, workers=args.workers)
        assert report is not None and report.added == len(paths) and not report.failed, report

    try:
        with torch.inference_mode():  # warm-up: first-call allocations, faiss and SQLite imports
            model.image_features(model.vision_embeds(pixels[:bs]))
        index(work / "warmup", files[:bs])

        runs: dict[str, list[float]] = {"forward": [], "index": []}
        parts: dict[str, list[float]] = {k: [] for k in (*spent, "rest")}
        for r in range(args.repeats):  # alternate (ABBA), so load changes on this shared machine hit both
            for name in ("forward", "index") if r % 2 == 0 else ("index", "forward"):
                if name == "index":
                    spent.update(embed=0.0, commit=0.0, faiss=0.0)
                t = time.perf_counter()
                if name == "forward":
                    expected = forward()
                else:
                    index(work / f"run-{r}", files)  # a fresh index folder each repeat
                runs[name].append(time.perf_counter() - t)
            for k, seconds in spent.items():
                parts[k].append(seconds)
            parts["rest"].append(runs["index"][-1] - sum(spent.values()))
            print(f"  repeat {r + 1}: forward {runs['forward'][-1]:.2f} s, index {runs['index'][-1]:.2f} s "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
        same = np.array_equal(stored(work / f"run-{args.repeats - 1}"), expected.astype(np.float16))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(files)
    rate = {k: n / statistics.median(v) for k, v in runs.items()}
    print(f"\n{'':<9} {'img/s':>7} {'s/run (median)':>15} {'runs':>24}")
    for k in ("forward", "index"):
        print(f"{k:<9} {rate[k]:>7.2f} {statistics.median(runs[k]):>15.2f}   {' '.join(f'{x:.2f}' for x in runs[k])}")
    print(f"ratio = index img/s / forward img/s = {rate['index'] / rate['forward']:.3f} (target >= 0.9); stored "
          f"vectors {'identical to' if same else 'DIFFER from'} the forward's (float16)")  # fmt: skip

    fwd = statistics.median(runs["forward"])
    med = {k: statistics.median(v) for k, v in parts.items()}
    total = statistics.median(runs["index"])
    print(f"\nindex run, median seconds: model {med['embed']:.2f} ({med['embed'] / fwd:.2f}x the pure forward, "
          f"{100 * med['embed'] / total:.0f}% of the run), store commits {med['commit']:.2f}, FAISS build + manifest "
          f"{med['faiss']:.2f}, rest (waiting for decoded images, diff) {med['rest']:.2f}")  # fmt: skip
    sha = per_image_ms(sha256_file, files)
    decode = per_image_ms(load_image, files)
    decoded = {f: load_image(f) for f in files}
    prep = per_image_ms(lambda f: enc.prepare(decoded[f]), files)
    mb = sum(f.stat().st_size for f in files) / n / 2**20
    print(f"per image, called serially (wall/CPU): sha256 {sha} ({mb:.2f} MB files), JPEG decode {decode}, resize + "
          f"normalise {prep}; the pure forward {1e3 * fwd / n:.0f} ms wall")  # fmt: skip
    print(f"total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} (others share this CPU)")


if __name__ == "__main__":
    main()
