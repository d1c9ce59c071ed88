"""Where CapFilt results go, resumably: a JSONL file (one record per image) or a folder of webdataset shards.

JSONL: records are appended and flushed one by one, so a kill loses at most the line being written (dropped on
the next open); a rerun skips images already recorded. Images whose every text was filtered out are recorded
with `"captions": []` so that a rerun does not redo them.
Shards: each output shard is written to NAME.tar.tmp and renamed to NAME.tar when complete, so a kill leaves
only whole shards; a rerun redoes the unfinished ones. The members are deterministic (no times, owners), so the
same input gives byte-identical shards.

Either way the settings are recorded beside the output (OUT.capfilt.json, or OUT/capfilt.json) and a rerun
with other settings is refused: its records would silently mix two recipes.
Under several processes, JSONL parts (OUT.part-RRRRR.jsonl) are merged by rank 0 in input order; shards are
written by their own process. Each process writes a done file with its counts; rank 0 waits for all of them.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any

from blip2cli.capfilt.sources import Group, Item
from blip2cli.errors import DiskFull, UsageError
from blip2cli.files import atomic_write, disk_full, is_disk_full, json_line
from blip2cli.jsonl import JsonlLog, changed_settings, read_jsonl


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        atomic_write(path, lambda f: f.write(data), len(data))
    except DiskFull:
        raise
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


def _check_settings(path: Path, settings: dict[str, Any], out: Path, rank: int) -> None:
    """The first run records its settings; later runs must match them."""
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8")).get("settings")
        except (OSError, json.JSONDecodeError, AttributeError):
            raise UsageError(f"{path}: unreadable capfilt settings; delete {out} to start over") from None
        changed = changed_settings(recorded if isinstance(recorded, dict) else {}, settings)
        if changed:
            raise UsageError(f"{out} was made with other settings ({changed}): use another --out, "
                             f"or delete it to start over")
    elif rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps({"settings": settings}, indent=1).encode())


def _batches(group: Group, batch_size: int) -> list[list[Item]]:
    """Fixed slices of a group: the same images share a batch in every run (same numbers)."""
    return [group.items[i : i + batch_size] for i in range(0, len(group.items), batch_size)]


def _wait_for(files: list[Path]) -> None:
    # Files, not a collective barrier: processes may finish far apart (past NCCL's timeout).
    while not all(f.exists() for f in files):
        time.sleep(0.5)


class JsonlOutput:
    def __init__(self, path: Path, settings: dict[str, Any], rank: int, world: int) -> None:
        self.path, self.rank, self.world = path, rank, world
        _check_settings(path.with_name(path.name + ".capfilt.json"), settings, path, rank)
        self.done = {r.get("key") for r in read_jsonl(path)}
        for part in self._parts():
            self.done |= {r.get("key") for r in read_jsonl(part)}
        self.order: list[str] = []
        self.log: JsonlLog | None = None

    def _parts(self) -> list[Path]:
        return sorted(self.path.parent.glob(self.path.name + ".part-*.jsonl"))

    def _mine(self) -> Path:
        return self.path if self.world == 1 else self.path.with_name(f"{self.path.name}.part-{self.rank:05d}.jsonl")

    def todo(self, groups: list[Group], batch_size: int, report) -> list[tuple[Group, list[Item]]]:
        """This process's batches (every world-th, over all groups) that hold an image not done yet."""
        self.order = [item.key for g in groups for item in g.items]
        work = [(g, b) for g in groups for b in _batches(g, batch_size)]
        mine = [w for i, w in enumerate(work) if i % self.world == self.rank]
        report.skipped = sum(1 for key in self.order if key in self.done) if self.rank == 0 else 0
        todo = [(g, b) for g, b in mine if any(item.key not in self.done for item in b)]
        if todo:
            self.log = JsonlLog(self._mine())
        return todo

    def add(self, group: Group, item: Item, result) -> bool:
        if item.key in self.done:
            return False
        if result is not None:
            assert self.log is not None
            self.log.write(result.record())
            self.done.add(item.key)
        return True

    def close(self) -> None:
        if self.log is not None:
            self.log.close()

    def merge(self, report):
        if self.world == 1:
            return report
        done_files = [self.path.with_name(f"{self.path.name}.done-{r:05d}.json") for r in range(self.world)]
        _atomic_write(done_files[self.rank], json.dumps(_counts(report)).encode())
        if self.rank != 0:
            return None
        _wait_for(done_files)
        _add_counts(report, done_files)
        records = {r["key"]: r for source in [self.path, *self._parts()] for r in read_jsonl(source)}
        order = set(self.order)
        lines = [json_line(records[k]) for k in self.order if k in records]
        lines += [json_line(r) for k, r in records.items() if k not in order]  # from inputs no longer given
        _atomic_write(self.path, "".join(lines).encode("utf-8"))
        for part in self._parts():
            part.unlink()
        for f in done_files:
            f.unlink(missing_ok=True)
        return report


class ShardOutput:
    def __init__(self, folder: Path, settings: dict[str, Any], rank: int, world: int) -> None:
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--out {folder}: not a folder (give FILE.jsonl for JSON lines, or a folder for shards)")
        self.folder, self.rank, self.world = folder, rank, world
        folder.mkdir(parents=True, exist_ok=True)
        _check_settings(folder / "capfilt.json", settings, folder, rank)
        self.left: dict[str, int] = {}  # images still to come per open shard
        self.tars: dict[str, tuple[tarfile.TarFile, Path]] = {}

    def todo(self, groups: list[Group], batch_size: int, report) -> list[tuple[Group, list[Item]]]:
        """This process's groups (every world-th) whose shard is not finished."""
        work = []
        for i, g in enumerate(groups):
            if (self.folder / f"{g.name}.tar").is_file():
                report.skipped += len(g.items) if self.rank == 0 else 0
            elif i % self.world == self.rank:
                self.left[g.name] = len(g.items)
                work.extend((g, b) for b in _batches(g, batch_size))
                if not g.items:
                    self._seal(g)
        return work

    def add(self, group: Group, item: Item, result) -> bool:
        if group.name not in self.tars:
            tmp = self.folder / f"{group.name}.tar.tmp"
            self.tars[group.name] = (tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT), tmp)
        tar, tmp = self.tars[group.name]
        if result is not None and result.captions:
            try:
                _add_member(tar, f"{item.key}.{item.ext}", item.image_bytes())
                _add_member(tar, f"{item.key}.json", json_line(result.record()).encode("utf-8"))
            except OSError as exc:
                if is_disk_full(exc, self.folder):
                    raise disk_full(tmp, 1 << 20) from None
                raise
        self.left[group.name] -= 1
        if self.left[group.name] == 0:
            self._seal(group)
        return True

    def _seal(self, group: Group) -> None:
        if group.name in self.tars:
            tar, tmp = self.tars.pop(group.name)
            tar.close()
        else:
            tmp = self.folder / f"{group.name}.tar.tmp"
            tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT).close()
        os.replace(tmp, self.folder / f"{group.name}.tar")

    def close(self) -> None:
        for tar, tmp in self.tars.values():  # unfinished (an exception): leave nothing that looks complete
            tar.close()
            tmp.unlink(missing_ok=True)
        self.tars.clear()

    def merge(self, report):
        if self.world == 1:
            return report
        done_files = [self.folder / f".done-{r:05d}.json" for r in range(self.world)]
        _atomic_write(done_files[self.rank], json.dumps(_counts(report)).encode())
        if self.rank != 0:
            return None
        _wait_for(done_files)
        _add_counts(report, done_files)
        for f in done_files:
            f.unlink(missing_ok=True)
        return report


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _counts(report) -> dict[str, Any]:
    return {"images": report.images, "kept": report.kept, "dropped": report.dropped,
            "failed": [list(f) for f in report.failed]}


def _add_counts(report, done_files: list[Path]) -> None:
    """Rank 0's report gets the other processes' counts (group errors are seen by every process: once)."""
    seen = set(report.failed)
    for f in done_files[1:]:
        counts = json.loads(f.read_text())
        report.images += counts["images"]
        report.kept += counts["kept"]
        report.dropped += counts["dropped"]
        for failure in map(tuple, counts["failed"]):
            if failure not in seen:
                seen.add(failure)
                report.failed.append(failure)
