"""The embedding store and the incremental indexer: add / change / delete, duplicates, moves, failures, kill -9."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip2cli.retrieval import index as index_mod
from blip2cli.retrieval.export import export_clip_retrieval
from blip2cli.retrieval.indexer import FnEncoder, index_images
from blip2cli.retrieval.store import FileEntry, NewContent, Store, StoreInfo

Q, D = 4, 16  # tiny query matrices keep every test in milliseconds
REPO = Path(__file__).resolve().parents[1]


def fake_embed(images: list[Image.Image]) -> np.ndarray:
    """Deterministic, content-dependent unit query vectors: a fixed projection of a 4x4 thumbnail."""
    w = np.random.default_rng(0).standard_normal((Q, D, 48)).astype(np.float32)
    x = np.stack(
        [np.asarray(im.convert("RGB").resize((4, 4))).astype(np.float32).reshape(-1) / 255 - 0.5 for im in images]
    )  # (B, 48)
    m = np.einsum("qdk,bk->bqd", w, x)  # (B, Q, D)
    return m / np.linalg.norm(m, axis=-1, keepdims=True)


class Counting:
    """An encoder factory that counts images embedded."""

    def __init__(self, fingerprint: str = "fake-0") -> None:
        self.embedded = 0
        self.fingerprint = fingerprint

    def __call__(self, name: str) -> FnEncoder:
        def embed(images: list[Image.Image]) -> np.ndarray:
            self.embedded += len(images)
            return fake_embed(images)

        return FnEncoder(embed, name, self.fingerprint, Q, D)


def make_images(folder: Path, n: int, seed: int = 0, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(start, start + n):
        path = folder / f"img{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def snapshot(index_dir: Path) -> dict[str, tuple[str, bytes]]:
    """path -> (sha256, query matrix bytes): what must be equal between two runs, whatever the row numbers."""
    with Store.open(index_dir) as store:
        out = {}
        for path, row, sha, _, _ in store.entries():
            out[path] = (sha, store.queries(np.array([row])).tobytes())
        return out


def run(folder: Path, index_dir: Path, enc: Counting | None = None, **kw) -> dict:
    return index_images(sorted(folder.glob("*")), index_dir, enc or Counting(), model="fake", **kw).record()


def test_incremental_add_change_delete(tmp_path):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    paths = make_images(photos, 6)
    enc = Counting()
    first = run(photos, idx, enc)
    assert first == {
        "index": str(idx),
        "added": 6,
        "updated": 0,
        "removed": 0,
        "unchanged": 0,
        "failed": [],
        "total": 6,
    }
    assert enc.embedded == 6
    before = snapshot(idx)

    make_images(photos, 2, seed=1, start=6)  # two new
    Image.new("RGB", (12, 12), (200, 10, 10)).save(paths[0])  # one changed
    paths[1].unlink()  # one deleted
    enc = Counting()
    second = run(photos, idx, enc)
    assert (second["added"], second["updated"], second["removed"], second["unchanged"], second["total"]) == (
        2,
        1,
        1,
        4,
        7,
    )
    assert enc.embedded == 3  # only the new and the changed file
    after = snapshot(idx)
    for p in map(str, paths[2:]):
        assert after[os.path.abspath(p)] == before[os.path.abspath(p)]  # untouched rows kept
    assert os.path.abspath(paths[1]) not in after
    with Store.open(idx) as store:
        assert store.count_images() == 7  # the changed file's old content is gone

    assert run(photos, idx)["unchanged"] == 7  # a rerun with nothing new embeds nothing


def test_touched_file_is_not_embedded_again(tmp_path):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    paths = make_images(photos, 3)
    run(photos, idx)
    os.utime(paths[0], ns=(10**18, 10**18))  # new mtime, same bytes: hashed, not embedded
    enc = Counting()
    assert run(photos, idx, enc)["unchanged"] == 3
    assert enc.embedded == 0


def test_same_content_under_two_paths_is_embedded_once(tmp_path):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    paths = make_images(photos, 3)
    shutil.copy(paths[0], photos / "copy.png")
    enc = Counting()
    assert run(photos, idx, enc)["added"] == 4
    assert enc.embedded == 3
    with Store.open(idx) as store:
        assert store.count_files() == 4 and store.count_images() == 3
        assert store.row_of_path(str(paths[0])) == store.row_of_path(str(photos / "copy.png"))
    paths[0].unlink()  # the copy still holds the content
    run(photos, idx)
    with Store.open(idx) as store:
        assert store.count_images() == 3
    (photos / "copy.png").unlink()
    run(photos, idx)
    with Store.open(idx) as store:
        assert store.count_images() == 2


def test_moved_file_keeps_its_row(tmp_path):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    paths = make_images(photos, 3)
    run(photos, idx)
    paths[1].rename(photos / "renamed.png")
    enc = Counting()
    report = run(photos, idx, enc)
    assert (report["added"], report["removed"], enc.embedded) == (1, 1, 0)


def test_unreadable_image_is_reported_and_the_rest_indexed(tmp_path):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    make_images(photos, 2)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    report = run(photos, idx)
    assert report["added"] == 2 and report["total"] == 2
    assert [f["path"] for f in report["failed"]] == [str(photos / "broken.jpg")]
    assert run(photos, idx)["failed"]  # still reported on the next run: it was never stored


def test_other_model_is_refused(tmp_path):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    make_images(photos, 2)
    run(photos, idx)
    make_images(photos, 1, seed=3, start=2)
    from blip2cli.errors import UsageError

    with pytest.raises(UsageError, match="was built with model 'fake'"):
        index_images(sorted(photos.glob("*")), idx, Counting("other-weights"), model="fake")


def test_uncommitted_rows_are_truncated_on_open(tmp_path):
    info = StoreInfo("m", "f", Q, D, rows_per_shard=4)
    mats = fake_embed([Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(6)])
    with Store.create(tmp_path, info) as store:
        store.commit(
            [NewContent(f"s{i}", 8, 8) for i in range(5)],
            mats[:5],
            [FileEntry(f"/p{i}", 1, 1, f"s{i}") for i in range(5)],
        )
        store._write_rows(5, mats[5:])  # what a batch killed before its COMMIT leaves behind
    with Store.open(tmp_path, writable=True) as store:
        assert (tmp_path / "vectors" / "query-00001.f16").stat().st_size == 1 * Q * D * 2
        np.testing.assert_array_equal(store.queries(np.arange(5)), mats[:5].astype(np.float16))  # across 2 shards
        assert store.next_row == 5


# ---------------------------------------------------------------------------------------------------------------
# kill -9 at any moment, then rerun == one uninterrupted run

_JOB = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.test_retrieval_store import fake_embed, Q, D
from blip2cli.retrieval.indexer import FnEncoder, index_images

def slow(images):
    time.sleep(0.1)  # a model that takes a while per batch
    return fake_embed(images)

folder, idx = Path(sys.argv[1]), Path(sys.argv[2])
print("start", flush=True)
index_images(sorted(folder.glob("*")), idx, lambda name: FnEncoder(slow, name, "fake-0", Q, D), model="fake",
             batch_size=3, workers=2)
print("done")
"""


def _job(tmp_path: Path, folder: Path, idx: Path) -> subprocess.Popen:
    script = tmp_path / "job.py"
    script.write_text(_JOB.format(repo=str(REPO)))
    return subprocess.Popen(
        [sys.executable, str(script), str(folder), str(idx)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted_run(tmp_path):
    photos = tmp_path / "photos"
    make_images(photos, 30)
    shutil.copy(photos / "img0003.png", photos / "dup.png")
    reference = tmp_path / "reference"
    assert _job(tmp_path, photos, reference).communicate(timeout=120)[0].split() == ["start", "done"]

    killed, partial = tmp_path / "killed", []
    for delay in (0.05, 0.35, 0.7, 1.0):  # 11 batches of 0.1 s: kills land before, during and after batches
        proc = _job(tmp_path, photos, killed)
        assert proc.stdout.readline().strip() == "start"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if Store.exists(killed):
            with Store.open(killed) as store:
                partial.append(store.count_files())
    assert any(0 < n < 31 for n in partial), partial  # at least one kill interrupted the work
    assert _job(tmp_path, photos, killed).communicate(timeout=120)[0].split() == ["start", "done"]

    assert snapshot(killed) == snapshot(reference)
    a, b = index_mod.Manifest.read(killed), index_mod.Manifest.read(reference)
    assert (a.count, a.ntotal, a.spec) == (b.count, b.ntotal, b.spec)
    from blip2cli.retrieval.rank import search_text

    with Store.open(killed) as s1, Store.open(reference) as s2:
        for row in (0, 7, 20):
            t = s2.queries(np.array([row]))[0, 1].astype(np.float32)
            h1 = search_text(s1, index_mod.LoadedIndex.load(killed, s1), t, k=5).hits
            h2 = search_text(s2, index_mod.LoadedIndex.load(reference, s2), t, k=5).hits
            assert h1 == h2
    assert not list(killed.glob(".*.tmp")) and len(list(killed.glob("index-*.faiss"))) == 1


# ---------------------------------------------------------------------------------------------------------------
# clip-retrieval export


def test_export_clip_retrieval_layout(tmp_path):
    photos, idx, out = tmp_path / "photos", tmp_path / "idx", tmp_path / "emb"
    make_images(photos, 5)
    shutil.copy(photos / "img0000.png", photos / "same.png")
    run(photos, idx)
    with Store.open(idx) as store:
        assert export_clip_retrieval(store, out, partition_size=4) == 2
    emb = [np.load(out / "img_emb" / f"img_emb_000{k}.npy") for k in range(2)]
    mats = [np.load(out / "img_query_emb" / f"img_query_emb_000{k}.npy") for k in range(2)]
    assert [e.shape for e in emb] == [(4, D), (2, D)] and emb[0].dtype == np.float16
    assert mats[0].shape == (4, Q, D) and mats[0].dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(emb[0].astype(np.float32), axis=1), 1, atol=2e-3)
    pq = pytest.importorskip("pyarrow.parquet")
    meta = pq.read_table(out / "metadata" / "metadata_0000.parquet").to_pylist()
    assert [m["image_path"] for m in meta] == sorted(str(p) for p in photos.glob("*"))[:4]
    with Store.open(idx) as store:  # row i of metadata <-> row i of img_query_emb
        np.testing.assert_array_equal(
            mats[0][1], store.queries(np.array([store.row_of_path(meta[1]["image_path"])]))[0]
        )


def test_export_writes_jsonl_without_pyarrow(tmp_path, monkeypatch):
    photos, idx, out = tmp_path / "photos", tmp_path / "idx", tmp_path / "emb"
    make_images(photos, 2)
    run(photos, idx)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with Store.open(idx) as store:
        export_clip_retrieval(store, out)
    lines = (out / "metadata" / "metadata_0000.jsonl").read_text().splitlines()
    assert [json.loads(line)["image_path"] for line in lines] == sorted(str(p) for p in photos.glob("*"))


# ---------------------------------------------------------------------------------------------------------------
# accelerate launch / torchrun: shards embedded by each process, merged by rank 0

_RANK = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from tests.test_retrieval_store import fake_embed, Q, D
from blip2cli.retrieval.indexer import FnEncoder, index_images

folder, idx = Path(sys.argv[1]), Path(sys.argv[2])
report = index_images(sorted(folder.glob("*")), idx, lambda name: FnEncoder(fake_embed, name, "fake-0", Q, D),
                      model="fake", batch_size=2)
print("rank report" if report is None else report.record())
"""


@pytest.mark.slow
def test_two_processes_give_the_single_process_result(tmp_path):
    pytest.importorskip("accelerate")
    photos = tmp_path / "photos"
    make_images(photos, 9)
    shutil.copy(photos / "img0001.png", photos / "dup.png")
    run(photos, tmp_path / "single")
    script = tmp_path / "rank.py"
    script.write_text(_RANK.format(repo=str(REPO)))
    port = str(29500 + os.getpid() % 1000)
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            ACCELERATE_USE_CPU="true",
            CUDA_VISIBLE_DEVICES="",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), str(photos), str(tmp_path / "multi")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert "'added': 10" in outs[0][0] and "'total': 10" in outs[0][0]
    assert snapshot(tmp_path / "multi") == snapshot(tmp_path / "single")
    assert not (tmp_path / "multi" / "parts").exists()
