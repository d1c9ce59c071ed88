"""Faults (issue 10): a full disk on every write path, and Ctrl-C. Each ends in one line and the right exit code (1 for
a full disk, 130 for Ctrl-C), removes its temporary files, leaves what was written before intact, and a rerun goes on.

A full disk is injected as OSError(ENOSPC) where the library writes; one test uses a real 1 MiB tmpfs (skipped when
mounting is not allowed) for what only a real full disk shows: SQLite readers that cannot create their -shm file."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from blip2cli.cli import app
from tests.test_retrieval_cli import FakeModel
from tests.test_retrieval_store import make_images

runner = CliRunner()


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def one_error_line(result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture
def encoder(monkeypatch):
    from blip2cli.retrieval import indexer

    monkeypatch.setattr(indexer, "load_encoder", lambda name, *args, **kwargs: FakeModel(name))


def _index(photos: Path, idx: Path, *extra: str):
    return runner.invoke(app, ["index", str(photos), "--index", str(idx), "--json", *extra])


def _search(idx: Path) -> list[dict]:
    result = runner.invoke(app, ["search", "a red bicycle", "--index", str(idx), "--json", "--no-rerank", "-k", "5"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# The helpers


def test_line_appender_never_leaves_half_a_line(tmp_path: Path, monkeypatch) -> None:
    from blip2cli.errors import DiskFull
    from blip2cli.files import LineAppender

    path = tmp_path / "log.jsonl"
    log = LineAppender(path)
    log.write('{"a": 1}\n')
    real_write = os.write

    def half_then_full(fd, data):  # the disk takes 5 bytes, then is full
        real_write(fd, bytes(data[:5]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFull, match=r"^no space left on /.*: 1 MB needed"):
        log.write('{"b": 2222222222}\n')
    monkeypatch.undo()
    log.close()
    assert path.read_text() == '{"a": 1}\n'


def test_atomic_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path: Path, monkeypatch) -> None:
    from blip2cli.errors import DiskFull
    from blip2cli.files import atomic_write_text

    path = tmp_path / "scores.json"
    atomic_write_text(path, "old\n")
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(DiskFull, match="no space left on"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n" and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# blip2 index / search


def test_index_new_on_a_full_disk(tmp_path: Path, encoder, monkeypatch) -> None:
    make_images(tmp_path / "photos", 6)
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", enospc)  # the store's vector rows
        line = one_error_line(_index(tmp_path / "photos", tmp_path / "idx"))
    assert line.startswith("error: no space left on /") and "MB needed" in line
    assert leftovers(tmp_path / "idx") == []
    result = _index(tmp_path / "photos", tmp_path / "idx")  # with space again, the rerun builds it
    assert result.exit_code == 0 and json.loads(result.stdout)["added"] == 6


@pytest.mark.parametrize("where", ["rows", "sqlite", "faiss", "manifest"])
def test_index_update_on_a_full_disk_leaves_search_unaffected(tmp_path: Path, encoder, monkeypatch, where) -> None:
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    make_images(photos, 8)
    assert _index(photos, idx).exit_code == 0
    before, files_before = _search(idx), sorted(p.name for p in idx.iterdir())
    make_images(photos, 8, seed=1, start=8)
    with monkeypatch.context() as m:
        if where == "rows":
            m.setattr(os, "pwrite", enospc)
        elif where == "sqlite":
            import sqlite3

            from blip2cli.retrieval import store

            def full_transaction(conn):
                raise sqlite3.OperationalError("database or disk is full")

            m.setattr(store, "_transaction", full_transaction)
        elif where == "faiss":
            import faiss

            m.setattr(faiss, "write_index", enospc)
        else:
            from blip2cli.retrieval.index import Manifest

            m.setattr(Manifest, "write", enospc)  # the commit point itself
        line = one_error_line(_index(photos, idx))
    assert "no space left on" in line and "what was written before is kept" in line
    assert leftovers(idx) == [] and sorted(p.name for p in idx.iterdir()) == files_before  # no new index files
    after = _search(idx)  # the intact index answers as before (never "no index")
    assert [h["path"] for h in after] == [h["path"] for h in before]
    result = _index(photos, idx)
    assert result.exit_code == 0 and json.loads(result.stdout)["total"] == 16


def test_index_export_on_a_full_disk(tmp_path: Path, encoder, monkeypatch) -> None:
    photos, idx, out = tmp_path / "photos", tmp_path / "idx", tmp_path / "export"
    make_images(photos, 4)
    real_save = np.save

    def full_save(file, array, *args, **kwargs):
        if array.ndim == 3:  # the query matrices: the pooled file went through, this one does not fit
            file.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(file, array, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(np, "save", full_save)
        line = one_error_line(_index(photos, idx, "--export", str(out)))
    assert "no space left on" in line and "img_query_emb_0000.npy" in line
    assert leftovers(out) == [] and not (out / "img_query_emb" / "img_query_emb_0000.npy").exists()
    assert _index(photos, idx, "--export", str(out)).exit_code == 0
    assert (out / "img_query_emb" / "img_query_emb_0000.npy").is_file()


def test_search_on_a_really_full_disk(tmp_path: Path, encoder) -> None:
    """SQLite readers need a -shm file, which a full disk cannot hold: the index must still be found and read."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        make_images(tmp_path / "photos", 6)
        idx = disk / "idx"
        assert _index(tmp_path / "photos", idx).exit_code == 0
        before = _search(idx)
        import sqlite3

        with sqlite3.connect(idx / "store.sqlite") as conn:  # as a clean close leaves it: no -wal, no -shm
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        for name in ("store.sqlite-wal", "store.sqlite-shm"):
            (idx / name).unlink(missing_ok=True)
        with open(disk / "filler", "wb") as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        assert _search(idx) == before  # was: "no index at ...: build one", inviting a rebuild of a good index
        make_images(tmp_path / "photos", 40, seed=2, start=6)
        line = one_error_line(_index(tmp_path / "photos", idx))
        assert f"no space left on {disk}" in line
        assert _search(idx) == before
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_ctrl_c_during_index_says_what_was_saved(tmp_path: Path, monkeypatch) -> None:
    from blip2cli.retrieval import indexer

    calls = []

    class Interrupting(FakeModel):
        def embed(self, images):
            calls.append(len(images))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return super().embed(images)

    monkeypatch.setattr(indexer, "load_encoder", lambda name, *args, **kwargs: Interrupting(name))
    make_images(tmp_path / "photos", 12)
    line = one_error_line(_index(tmp_path / "photos", tmp_path / "idx", "--batch-size", "4"), 130)
    assert "interrupted: 4 files are saved in" in line and "rerun the same command to go on" in line
    result = _index(tmp_path / "photos", tmp_path / "idx", "--batch-size", "4")
    assert result.exit_code == 0 and json.loads(result.stdout)["added"] == 8 and calls[2:] == [4, 4]


# ---------------------------------------------------------------------------------------------------------------
# eval --out


def test_eval_out_on_a_full_disk_keeps_the_previous_scores(tmp_path: Path, monkeypatch) -> None:
    anns = {"data_subtype": "val2014", "annotations": [
        {"question_id": 1, "image_id": 9, "answers": [{"answer": "2"}] * 10, "answer_type": "number",
         "question_type": "how many"}]}  # fmt: skip
    (tmp_path / "anns.json").write_text(json.dumps(anns))
    (tmp_path / "preds.json").write_text(json.dumps([{"question_id": 1, "answer": "2"}]))
    out = tmp_path / "run"
    args = ["eval", "vqa", "--annotations", str(tmp_path / "anns.json"), "--predictions", str(tmp_path / "preds.json"),
            "--out", str(out)]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    scores = (out / "scores.json").read_text()
    monkeypatch.setattr(os, "fsync", enospc)
    line = one_error_line(runner.invoke(app, args))
    assert "no space left on" in line and "scores.json" in line
    assert (out / "scores.json").read_text() == scores and leftovers(out) == []  # was: a 0-byte scores.json


# ---------------------------------------------------------------------------------------------------------------
# caption --out


def test_caption_out_on_a_full_disk(tmp_path: Path, tiny_opt_dir: Path, monkeypatch) -> None:
    make_images(tmp_path / "photos", 3)
    out = tmp_path / "captions.jsonl"
    args = ["caption", str(tmp_path / "photos"), "--model", str(tiny_opt_dir), "--device", "cpu", "--out", str(out),
            "--max-new-tokens", "3", "--num-beams", "1", "--batch-size", "1"]  # fmt: skip
    monkeypatch.setattr(os, "write", _partial_then_full(os.write, after=1))
    line = one_error_line(runner.invoke(app, args))
    monkeypatch.undo()
    assert "no space left on" in line and "captions.jsonl" in line
    lines = out.read_text().splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].endswith("\n")  # was: a cut-off second line
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "1 of 3 images already captioned" in again.stderr
    assert len(out.read_text().splitlines()) == 3


def _partial_then_full(real_write, after: int):
    """os.write that lets `after` writes through whole, then writes part of the next one and reports ENOSPC."""
    count = {"n": 0}

    def write(fd, data):
        if count["n"] >= after:
            real_write(fd, bytes(data[:7]))
            raise OSError(errno.ENOSPC, "No space left on device")
        count["n"] += 1
        return real_write(fd, data)

    return write
