"""The embedding store: what an index folder knows, and the source of truth the FAISS index is rebuilt from.

    INDEX_DIR/store.sqlite             meta, files (path, size, mtime_ns, sha256), contents (sha256 -> row, width, height)
    INDEX_DIR/vectors/query-00000.f16  raw float16 (Q, D) ITC query matrices, row r in shard r // rows_per_shard
    INDEX_DIR/vectors/pooled-00000.f16 raw float16 (D,) pooled vectors (re-normalised mean of the Q), same rows

One row per distinct content: two paths with the same bytes share a row and are embedded once.

Why append-only raw shards and not SQLite blobs: search re-scores every candidate exactly from its (32, 256) matrix
(16 KiB), and at a million images the matrices are 16.4 GB. A memory-mapped shard turns "fetch 300 candidates"
into one numpy gather that reads only those pages, and index builds stream the shards sequentially; blobs would
cost a query per row and copy every matrix through Python. Crash safety comes from ordering, not from the files:
a batch's rows are written and fsynced *before* the SQLite transaction that points at them commits, and a writer
opening the store truncates bytes past the committed row count (what a killed batch leaves). Rows of contents that
no path refers to any more become dead space (`dead_rows`), never rewritten in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from blip2cli.errors import UsageError
from blip2cli.files import is_disk_full, open_regular

if TYPE_CHECKING:
    from typing_extensions import Self

FORMAT = 1
ROWS_PER_SHARD = 65536  # 1 GiB query shards at 32 x 256 float16
_SQL_CHUNK = 900  # bound parameters per statement (SQLite's historical limit is 999)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS contents (
    sha256 TEXT PRIMARY KEY, row INTEGER NOT NULL UNIQUE, width INTEGER NOT NULL, height INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS files_by_sha ON files (sha256);
"""


@dataclass(frozen=True)
class StoreInfo:
    """What the vectors mean: the model that made them and their shape. Fixed when the store is created."""

    model: str  # name or path the user gave (--model)
    fingerprint: str  # identifies the weights; a different fingerprint may not add to or search this store
    num_queries: int  # Q, 32 for BLIP-2
    dim: int  # D, 256 for BLIP-2's ITC projection
    rows_per_shard: int = ROWS_PER_SHARD

    @property
    def quantize(self) -> str:
        """none, int8 or int4: the --quantize the vectors were made with (load.finish: "<weights>[:int8|int4]")."""
        return self.fingerprint.partition(":")[2] or "none"


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class NewContent:
    sha256: str
    width: int
    height: int


def sha256_file(path: str | Path) -> str:
    """Raises InputError for what is not a regular file (a named pipe would block, /dev/zero never end)."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pool(mats: np.ndarray) -> np.ndarray:
    """The pooled image vector: re-normalised mean of the query vectors, (B, Q, D) -> (B, D) float32."""
    v = mats.mean(axis=1, dtype=np.float32)  # (B, D), float32 accumulation without a float32 copy of mats  # (B, D)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


class Store:
    """An embedding folder. Readers see the last committed state; one writer at a time (a file lock)."""

    def __init__(self, root: Path, conn: sqlite3.Connection, info: StoreInfo, lock: int | None) -> None:
        self.root = root
        self.info = info
        self._conn = conn
        self._lock = lock  # fd holding the writer lock; None for readers
        self._maps: dict[tuple[str, int], tuple[mmap.mmap, np.ndarray]] = {}
        self._local = threading.local()  # per-thread read connections (decode workers look up hashes)
        (root / "vectors").mkdir(exist_ok=True)

    # -- opening ----------------------------------------------------------------------------------------------

    @staticmethod
    def exists(root: Path) -> bool:
        path = root / "store.sqlite"
        if not path.is_file():
            return False
        try:
            with contextlib.closing(_connect(path, readonly=True)) as conn:
                return conn.execute("SELECT value FROM meta WHERE key = 'format'").fetchone() is not None
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # created by a run killed before its first commit
                return False
            full = " (the disk is full: SQLite needs a few kB beside it to read it)" if is_disk_full(exc, root) else ""
            raise UsageError(f"cannot read the index store {path}: {exc}{full}") from None

    @classmethod
    def open(cls, root: Path, writable: bool = False) -> Store:
        root = Path(root)
        if not cls.exists(root):
            raise UsageError(f"no index at {root}: build one with `blip2 index PHOTOS --index {root}`")
        lock = _take_lock(root) if writable else None
        conn = _connect(root / "store.sqlite", readonly=not writable)  # a reader writes nothing (a full disk)
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        if int(meta["format"]) != FORMAT:
            raise UsageError(f"{root}: store format {meta['format']} is not supported by this version ({FORMAT})")
        info = StoreInfo(
            meta["model"], meta["fingerprint"], int(meta["num_queries"]), int(meta["dim"]), int(meta["rows_per_shard"])
        )
        store = cls(root, conn, info, lock)
        if writable:
            store._truncate_uncommitted()
        return store

    @classmethod
    def create(cls, root: Path, info: StoreInfo) -> Store:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        lock = _take_lock(root)
        conn = _connect(root / "store.sqlite")
        meta = {
            "format": FORMAT,
            "model": info.model,
            "fingerprint": info.fingerprint,
            "num_queries": info.num_queries,
            "dim": info.dim,
            "rows_per_shard": info.rows_per_shard,
            "next_row": 0,
            "generation": 0,
        }
        with _transaction(conn):  # schema and meta appear together or not at all
            for statement in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(statement)
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
        store = cls(root, conn, info, lock)
        store._truncate_uncommitted()  # shards left by a killed earlier attempt
        return store

    def close(self) -> None:
        self._maps.clear()
        self._conn.close()
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
            self._lock = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_model(self, name: str, fingerprint: str) -> None:
        """Refuse vectors of another model (they are not comparable), saying what to do instead."""
        weights, _, quantized = fingerprint.partition(":")  # load.finish: "<weights>[:int8|int4]"
        if weights == self.info.fingerprint.partition(":")[0]:
            self.check_quantize(quantized or "none")
        if fingerprint != self.info.fingerprint:
            raise UsageError(
                f"{self.root} was built with model '{self.info.model}' (weights {self.info.fingerprint[:12]}), "
                f"not '{name}' (weights {fingerprint[:12]}): embeddings of different models cannot be compared; "
                f"use --model {self.info.model}, or another --index folder for this model"
            )

    def check_quantize(self, quantize: str) -> None:
        """Refuse vectors of differently quantized weights (checked before a model loads where it can be)."""
        if quantize != self.info.quantize:
            raise UsageError(
                f"{self.root} was built with --quantize {self.info.quantize}, not {quantize}: vectors of differently "
                f"quantized weights are not mixed; use --quantize {self.info.quantize}, or another "
                "--index folder"
            )

    # -- reading ----------------------------------------------------------------------------------------------

    def _meta_int(self, key: str) -> int:
        return int(self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    @property
    def generation(self) -> int:
        """Bumped by every commit that adds or drops a content row; the index manifest records the one it saw."""
        return self._meta_int("generation")

    @property
    def next_row(self) -> int:
        return self._meta_int("next_row")

    def count_images(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM contents").fetchone()[0]

    def count_files(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]

    def dead_rows(self) -> int:
        return self.next_row - self.count_images()

    def files(self) -> dict[str, FileEntry]:
        return {r[0]: FileEntry(*r) for r in self._conn.execute("SELECT path, size, mtime_ns, sha256 FROM files")}

    def contents(self) -> dict[str, tuple[int, int, int]]:
        """sha256 -> (row, width, height) for every content."""
        return {r[0]: tuple(r[1:]) for r in self._conn.execute("SELECT sha256, row, width, height FROM contents")}

    def has_content(self, sha256: str) -> bool:
        """Thread-safe: decode workers call this to skip decoding bytes that are already embedded."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.root / "store.sqlite", readonly=True)
        return conn.execute("SELECT 1 FROM contents WHERE sha256 = ?", (sha256,)).fetchone() is not None

    def live_rows(self) -> np.ndarray:
        """Rows of every content some path refers to, ascending, int64."""
        rows = self._conn.execute("SELECT row FROM contents ORDER BY row").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def paths(self, rows: Sequence[int]) -> dict[int, list[str]]:
        """row -> the paths holding that content, sorted."""
        out: dict[int, list[str]] = {}
        rows = [int(r) for r in rows]
        for i in range(0, len(rows), _SQL_CHUNK):
            part = rows[i : i + _SQL_CHUNK]
            sql = (
                "SELECT c.row, f.path FROM contents c JOIN files f ON f.sha256 = c.sha256 "
                f"WHERE c.row IN ({','.join('?' * len(part))}) ORDER BY f.path"
            )
            for row, path in self._conn.execute(sql, part):
                out.setdefault(row, []).append(path)
        return out

    def entries(self) -> Iterator[tuple[str, int, str, int, int]]:
        """(path, row, sha256, width, height) for every file, by path."""
        yield from self._conn.execute(
            "SELECT f.path, c.row, c.sha256, c.width, c.height FROM files f JOIN contents c ON c.sha256 = f.sha256 "
            "ORDER BY f.path"
        )

    def row_of_path(self, path: str) -> int | None:
        r = self._conn.execute(
            "SELECT c.row FROM files f JOIN contents c ON c.sha256 = f.sha256 WHERE f.path = CAST(? AS TEXT)",
            (_db_path(path),),
        ).fetchone()
        return None if r is None else r[0]

    def queries(self, rows: np.ndarray) -> np.ndarray:
        """Gather query matrices: rows (n,) -> (n, Q, D) float16, reading only those rows' pages."""
        return self._gather("query", np.asarray(rows, dtype=np.int64), (self.info.num_queries, self.info.dim))

    def pooled(self, rows: np.ndarray) -> np.ndarray:
        """Gather pooled vectors: rows (n,) -> (n, D) float16."""
        return self._gather("pooled", np.asarray(rows, dtype=np.int64), (self.info.dim,))

    def iter_live(self, kind: str, chunk: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (rows, vectors) over all live rows in row order; kind is 'query' or 'pooled'."""
        rows = self.live_rows()
        gather = self.queries if kind == "query" else self.pooled
        for i in range(0, len(rows), chunk):
            yield rows[i : i + chunk], gather(rows[i : i + chunk])

    def _shard_path(self, kind: str, shard: int) -> Path:
        return self.root / "vectors" / f"{kind}-{shard:05d}.f16"

    def _gather(self, kind: str, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty((len(rows), *shape), dtype=np.float16)
        rps = self.info.rows_per_shard
        shards, offsets = np.divmod(rows, rps)
        for shard in np.unique(shards):
            sel = shards == shard
            mm, array = self._map(kind, int(shard), shape, int(offsets[sel].max()) + 1)
            _prefetch(mm, offsets[sel], array[0].nbytes)  # announce every row first: cold rows load concurrently
            out[sel] = array[offsets[sel]]
        return out

    def _map(self, kind: str, shard: int, shape: tuple[int, ...], need: int) -> tuple[mmap.mmap, np.ndarray]:
        mapped = self._maps.get((kind, shard))
        if mapped is None or len(mapped[1]) < need:  # the shard grew since it was mapped (this process wrote)
            path = self._shard_path(kind, shard)
            n = path.stat().st_size // (int(np.prod(shape)) * 2) if path.exists() else 0
            if n < need:
                raise RuntimeError(f"{path}: holds {n} rows, row {need - 1} is committed (store damaged?)")
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mm, "madvise"):  # no read-ahead: a 16 KiB row would pull in 128 KiB around it
                mm.madvise(mmap.MADV_RANDOM)
            array = np.frombuffer(mm, dtype=np.float16, count=n * int(np.prod(shape))).reshape(n, *shape)
            mapped = self._maps[(kind, shard)] = (mm, array)
        return mapped

    # -- writing ----------------------------------------------------------------------------------------------

    def commit(
        self,
        new: Sequence[NewContent] = (),
        mats: np.ndarray | None = None,
        upsert: Sequence[FileEntry] = (),
        remove: Sequence[str] = (),
        drop_orphans: bool = True,
    ) -> None:
        """One atomic step: append `mats` (len(new), Q, D) as rows for the `new` contents, point `upsert` paths at
        their content, drop `remove` paths, and (unless `drop_orphans` is False: merges, which may link to a
        content before the path still holding it moves on) delete the contents those paths no longer refer to.

        A kill before the final COMMIT leaves the store exactly as before this call (the appended bytes are past
        the committed row count and are truncated when a writer next opens the store)."""
        assert self._lock is not None, "store opened read-only"
        try:
            self._commit(new, mats, upsert, remove, drop_orphans)
        except (OSError, sqlite3.Error) as exc:
            if is_disk_full(exc, self.root):  # the caller reports it (indexer: with what the whole run needs)
                self._truncate_uncommitted()  # give back the space this batch's rows took
            raise

    def _commit(self, new: Sequence[NewContent], mats: np.ndarray | None, upsert: Sequence[FileEntry],
                remove: Sequence[str], drop_orphans: bool) -> None:  # fmt: skip
        first = self.next_row
        if new:
            assert mats is not None and mats.shape == (len(new), self.info.num_queries, self.info.dim), mats.shape
            self._write_rows(first, mats)
        with _transaction(self._conn) as conn:
            touched = {e.sha256 for e in new}
            old = self._shas_of([e.path for e in upsert] + list(remove))
            conn.executemany(
                "INSERT INTO contents VALUES (?, ?, ?, ?)",
                [(c.sha256, first + i, c.width, c.height) for i, c in enumerate(new)],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO files VALUES (CAST(? AS TEXT), ?, ?, ?)",
                [(_db_path(e.path), e.size, e.mtime_ns, e.sha256) for e in upsert],
            )
            conn.executemany("DELETE FROM files WHERE path = CAST(? AS TEXT)", [(_db_path(p),) for p in remove])
            dropped = 0
            for sha in (old | touched) if drop_orphans else ():
                dropped += conn.execute(
                    "DELETE FROM contents WHERE sha256 = ? AND NOT EXISTS (SELECT 1 FROM files WHERE files.sha256 = ?)",
                    (sha, sha),
                ).rowcount
            conn.execute("UPDATE meta SET value = ? WHERE key = 'next_row'", (str(first + len(new)),))
            if new or dropped:
                conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def drop_orphans(self) -> int:
        """Delete every content no path refers to (after merges, or a kill between a merge and this sweep)."""
        with _transaction(self._conn) as conn:
            dropped = conn.execute("DELETE FROM contents WHERE sha256 NOT IN (SELECT sha256 FROM files)").rowcount
            if dropped:
                conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        return dropped

    def _shas_of(self, paths: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(paths), _SQL_CHUNK):
            part = [_db_path(p) for p in paths[i : i + _SQL_CHUNK]]
            sql = f"SELECT sha256 FROM files WHERE path IN ({','.join(['CAST(? AS TEXT)'] * len(part))})"
            found.update(r[0] for r in self._conn.execute(sql, part))
        return found

    def _write_rows(self, first: int, mats: np.ndarray) -> None:
        """Write rows first.. at their fixed offsets in both shard kinds, then fsync (before the commit)."""
        rps = self.info.rows_per_shard
        pooled = pool(mats).astype(np.float16)
        mats = mats.astype(np.float16, copy=False)
        i = 0
        while i < len(mats):
            shard, offset = divmod(first + i, rps)
            n = min(len(mats) - i, rps - offset)
            for kind, block in (("query", mats[i : i + n]), ("pooled", pooled[i : i + n])):
                path = self._shard_path(kind, shard)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.pwrite(fd, np.ascontiguousarray(block).tobytes(), offset * block[0].nbytes)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            i += n

    def _truncate_uncommitted(self) -> None:
        """Cut every shard back to the committed rows: a killed batch may have written past them."""
        committed = self.next_row
        rps = self.info.rows_per_shard
        row_bytes = {"query": self.info.num_queries * self.info.dim * 2, "pooled": self.info.dim * 2}
        for path in sorted((self.root / "vectors").glob("*.f16")):
            kind, shard = path.stem.rsplit("-", 1)
            rows = min(max(committed - int(shard) * rps, 0), rps)
            if rows == 0:
                path.unlink()
            elif path.stat().st_size > rows * row_bytes[kind]:
                os.truncate(path, rows * row_bytes[kind])
        self._maps.clear()


def _prefetch(mm: mmap.mmap, offsets: np.ndarray, row_bytes: int) -> None:
    """madvise(WILLNEED) the rows, one call per run of consecutive rows: asynchronous reads that the disk serves
    in parallel, where page faults during the gather read rows one by one (1M images, cold: p50 38 -> 22 ms)."""
    if not hasattr(mm, "madvise"):
        return
    rows = np.unique(offsets)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, breaks):
        start = int(run[0]) * row_bytes // mmap.PAGESIZE * mmap.PAGESIZE  # madvise wants page-aligned starts
        mm.madvise(mmap.MADV_WILLNEED, start, (int(run[-1]) + 1) * row_bytes - start)


def _db_path(path: str) -> bytes:
    """A path as SQLite TEXT: its bytes on disk (UTF-8 for every valid name, so older stores read the same), bound
    as a blob and CAST to TEXT, as a name that is not UTF-8 cannot be bound as a Python str."""
    return os.fsencode(path)


def _text(data: bytes) -> str:
    """Read TEXT back the way Python names files: undecodable bytes as surrogates, so `open()` finds the file."""
    return data.decode("utf-8", "surrogateescape")


def _uri(path: Path, immutable: bool = False) -> str:
    """A read-only SQLite URI; the name is %-quoted (a folder called `a?b#c` or one that is not UTF-8)."""
    return f"file:{urllib.parse.quote(os.fsencode(path))}?mode=ro{'&immutable=1' if immutable else ''}"


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A reader. On a full disk SQLite cannot create the WAL index (-shm) a reader needs (SQLITE_IOERR_SHMSIZE);
    when no -wal file holds commits not yet in the database, the file alone is complete, and is read as immutable."""
    options = {"uri": True, "isolation_level": None, "check_same_thread": False}
    conn = sqlite3.connect(_uri(path), **options)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as exc:
        conn.close()
        wal = path.with_name(path.name + "-wal")
        if "I/O error" not in str(exc) or (wal.exists() and wal.stat().st_size > 0):
            raise
    return sqlite3.connect(_uri(path, immutable=True), **options)


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = _connect_readonly(path)
    else:
        conn = sqlite3.connect(path, isolation_level=None)  # autocommit; transactions are explicit
        conn.execute("PRAGMA journal_mode = WAL")  # readers (search, decode workers) never block the writer
        conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.text_factory = _text
    return conn


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _take_lock(root: Path) -> int:
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{root} is being written by another `blip2 index`; wait for it to finish") from None
    return fd
