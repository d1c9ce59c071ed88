"""What users' folders hold (issue 10): named pipes, links to /dev/zero, symlink loops, broken links, names that are
not UTF-8 and names that look like rich markup. Each is one failed input (or a name printed as it is), never a hang,
a crash or a lost photo. Anything that could block runs in a daemon thread with a bounded wait."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.data.images import load_image
from blip2cli.data.inputs import expand_inputs
from blip2cli.errors import InputError, UsageError
from blip2cli.retrieval.store import sha256_file
from tests.test_retrieval_cli import FakeModel

runner = CliRunner()
BAD_NAME = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8


class BytesFakeModel(FakeModel):
    def itm(self, paths, text):
        return super().itm([os.fsencode(p).decode("latin-1") for p in paths], text)


@pytest.fixture
def fake_model(monkeypatch):
    from blip2cli.retrieval import indexer

    monkeypatch.setattr(indexer, "load_encoder", lambda name, *args, **kwargs: BytesFakeModel(name))


def bounded(fn: Callable[[], Any], timeout: float = 60.0) -> Any:
    """fn() in a daemon thread; fails the test (instead of hanging it) when it does not return in time."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (handed back to the test)
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s (blocked on a pipe or a device?)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _image(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), (seed * 40 % 256, seed * 90 % 256, seed * 10 % 256)).save(path, format="PNG")
    return path


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """good.png, a[/]b.png (a folder `a[` holding `]b.png`), café.png in Latin-1, [red]broken.jpg (not an image),
    pipe.jpg (a FIFO), zero.jpg -> /dev/zero, loop1/loop2.jpg (a symlink loop), dangling.jpg (a broken link)."""
    root = tmp_path / "photos"
    _image(root / "good.png", 1)
    _image(root / "a[" / "]b.png", 2)
    _image(root / BAD_NAME, 3)
    (root / "[red]broken.jpg").write_bytes(b"not a picture")
    os.mkfifo(root / "pipe.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.symlink("loop2.jpg", root / "loop1.jpg")
    os.symlink("loop1.jpg", root / "loop2.jpg")
    os.symlink("nowhere.jpg", root / "dangling.jpg")
    return root


BAD = {"[red]broken.jpg": "not an image", "pipe.jpg": "named pipe", "zero.jpg": "a device",
       "loop1.jpg": "symlink loop", "loop2.jpg": "symlink loop", "dangling.jpg": "broken symlink"}  # fmt: skip
GOOD = {"good.png", "]b.png", BAD_NAME}


# ---------------------------------------------------------------------------------------------------------------
# Reading


def test_named_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")  # no writer: a plain open() blocks forever
    with pytest.raises(InputError, match=r"^not a regular file \(a named pipe\): .*pipe.jpg$"):
        bounded(lambda: load_image(tmp_path / "pipe.jpg"), 20)
    with pytest.raises(InputError, match="named pipe"):
        bounded(lambda: sha256_file(tmp_path / "pipe.jpg"), 20)


def test_link_to_dev_zero_is_refused_without_reading_it(tmp_path: Path) -> None:
    os.symlink("/dev/zero", tmp_path / "zero.jpg")  # hashing it would never end
    with pytest.raises(InputError, match=r"^not a regular file \(a device\): "):
        bounded(lambda: sha256_file(tmp_path / "zero.jpg"), 20)
    with pytest.raises(InputError, match="a device"):
        bounded(lambda: load_image(tmp_path / "zero.jpg"), 20)


def test_file_size_limit(tmp_path: Path) -> None:
    from blip2cli.files import open_regular

    (tmp_path / "big.png").write_bytes(b"x" * 2048)
    with pytest.raises(InputError, match="file too large"):
        open_regular(tmp_path / "big.png", max_bytes=1024)


def test_loops_and_broken_links_are_one_message_each(tmp_path: Path) -> None:
    os.symlink("b.jpg", tmp_path / "a.jpg")
    os.symlink("a.jpg", tmp_path / "b.jpg")
    os.symlink("gone.jpg", tmp_path / "c.jpg")
    with pytest.raises(InputError, match=r"^symlink loop: .*a.jpg$"):
        load_image(tmp_path / "a.jpg")
    with pytest.raises(InputError, match=r"^broken symlink \(its target does not exist\): .*c.jpg$"):
        load_image(tmp_path / "c.jpg")


# ---------------------------------------------------------------------------------------------------------------
# Expanding inputs


def test_folder_walk_keeps_every_hostile_entry_as_an_input(hostile: Path) -> None:
    found = bounded(lambda: expand_inputs([str(hostile)]))  # Path.resolve() raised "Symlink loop" here
    assert {p.name for p in found} == GOOD | set(BAD)


def test_glob_reports_loops_and_broken_links_as_the_walk_does(hostile: Path) -> None:
    walked = {p.name for p in expand_inputs([str(hostile)]) if p.parent == hostile}
    globbed = {p.name for p in bounded(lambda: expand_inputs([str(hostile / "*.jpg")]))}
    assert {"loop1.jpg", "loop2.jpg", "dangling.jpg", "pipe.jpg", "zero.jpg"} <= globbed
    assert globbed == {n for n in walked if n.endswith(".jpg")}


def test_named_broken_link_is_a_usage_error(tmp_path: Path) -> None:
    os.symlink("gone.jpg", tmp_path / "c.jpg")
    with pytest.raises(UsageError, match="broken or looping symlink"):
        expand_inputs([str(tmp_path / "c.jpg")])


# ---------------------------------------------------------------------------------------------------------------
# Names in outputs


def test_json_lines_escape_undecodable_bytes_and_round_trip() -> None:
    from blip2cli.files import json_line, printable

    line = json_line({"image": f"/x/{BAD_NAME}", "caption": "un café"})
    line.encode("utf-8")  # valid UTF-8 (raw surrogates would raise here)
    assert "\\udce9" in line and "café" in line  # only the undecodable byte is escaped
    assert os.fsencode(json.loads(line)["image"]) == b"/x/caf\xe9.png"
    assert printable(f"/x/{BAD_NAME}") == "/x/caf\\xe9.png"


def test_index_hostile_folder(hostile: Path, tmp_path: Path, fake_model) -> None:
    idx = tmp_path / "idx"
    result = bounded(lambda: runner.invoke(app, ["index", str(hostile), "--index", str(idx), "--json"]))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    record = json.loads(result.stdout)
    assert {Path(f["path"]).name: f["error"] for f in record["failed"]}.keys() == BAD.keys()
    for failure in record["failed"]:
        assert BAD[Path(failure["path"]).name] in failure["error"]
    assert record["added"] == 3 and record["total"] == 3  # the good photos, the Latin-1 name among them
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(BAD)
    for line in warnings:  # one line each, the path once, brackets printed as they are
        assert line.count(str(hostile)) == 1, line
    assert any("[red]broken.jpg" in line for line in warnings)

    from blip2cli.retrieval.store import Store

    with Store.open(idx) as store:
        assert {Path(p).name for p in store.files()} == GOOD  # the undecodable name is stored and read back intact
    assert (hostile / BAD_NAME).is_file()

    again = runner.invoke(app, ["index", str(hostile), "--index", str(idx), "--json"])
    assert json.loads(again.stdout)["unchanged"] == 3

    hits = runner.invoke(app, ["search", "a photo", "--index", str(idx), "--json", "--html", str(tmp_path / "h.html")])
    assert hits.exit_code == 0, hits.output
    paths = {Path(json.loads(line)["path"]).name for line in hits.stdout.splitlines()}
    assert paths == GOOD
    assert "caf\\xe9.png" in (tmp_path / "h.html").read_text(encoding="utf-8")
    table = runner.invoke(app, ["search", "a photo", "--index", str(idx)])
    assert table.exit_code == 0 and "caf\\xe9.png" in table.stdout


def test_index_export_with_an_undecodable_name(hostile: Path, tmp_path: Path, fake_model) -> None:
    out = tmp_path / "export"
    result = runner.invoke(app, ["index", str(hostile / "good.png"), str(hostile / BAD_NAME), "--index",
                                 str(tmp_path / "idx"), "--export", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = next((out / "metadata").iterdir())
    if meta.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = {Path(p).name for p in pq.read_table(meta).column("image_path").to_pylist()}
        assert names == {"good.png", "caf\\xe9.png"}
    else:
        names = {Path(json.loads(line)["image_path"]).name for line in meta.read_text().splitlines()}
        assert names == {"good.png", BAD_NAME}


def test_warnings_are_one_line_at_any_width(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from blip2cli import render

    monkeypatch.setattr(render.console, "_width", 30)
    render.warn("/a/very/long/path/to/some/folder/of/photos/[red]broken.jpg: not an image at all, sorry")
    render.error("[/] cannot break anything")
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: /a/very/long/path/to/some/folder/of/photos/[red]broken.jpg: not an image at all, sorry",
                   "error: [/] cannot break anything"]  # fmt: skip


def test_caption_hostile_folder(hostile: Path, tmp_path: Path, tiny_opt_dir: Path) -> None:
    out = tmp_path / "captions.jsonl"
    args = ["caption", str(hostile), "--model", str(tiny_opt_dir), "--device", "cpu", "--max-new-tokens", "3",
            "--num-beams", "1", "--out", str(out)]  # fmt: skip
    result = bounded(lambda: runner.invoke(app, [*args, "--json"]), 240)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    result.stdout_bytes.decode("utf-8")  # --json is valid UTF-8, whatever the names
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {Path(r["image"]).name for r in records if "caption" in r} == GOOD
    assert {Path(r["image"]).name for r in records if "error" in r} == set(BAD)
    assert out.read_bytes().decode("utf-8").count("\n") == len(GOOD) + len(BAD)
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert any(os.fsencode(r["image"]).endswith(b"caf\xe9.png") for r in written)  # the bytes come back

    table = runner.invoke(app, args)  # a rerun: the done images are skipped, the failures reported again
    assert table.exit_code == 1, table.output
    assert "3 of 9 images already captioned" in table.stderr
    assert "[red]broken.jpg" in table.stderr  # rich markup in a name is printed, not applied


def test_ask_batch_with_a_bom_and_a_folder(tmp_path: Path) -> None:
    from blip2cli.ask import BatchQuestion, read_batch

    batch = tmp_path / "questions.jsonl"
    batch.write_bytes(b'\xef\xbb\xbf{"image": "x.png", "question": "what is it?"}\n')  # Notepad's "UTF-8"
    assert read_batch(batch) == [BatchQuestion(1, str(tmp_path / "x.png"), "what is it?")]
    result = runner.invoke(app, ["ask", "--batch", str(tmp_path), "--model", "none"])
    assert result.exit_code == 2
    assert "is a folder" in result.stderr and "no such file" not in result.stderr


def test_out_file_that_is_a_pipe_or_a_device_is_refused_without_blocking(tmp_path: Path) -> None:
    from blip2cli.jsonl import JsonlLog

    os.mkfifo(tmp_path / "out.jsonl")  # no reader: a plain open for writing blocks forever
    with pytest.raises(UsageError, match=r"not a regular file \(a named pipe\)"):
        bounded(lambda: JsonlLog(tmp_path / "out.jsonl"), 20)
    with pytest.raises(UsageError, match=r"not a regular file \(a device\)"):
        bounded(lambda: JsonlLog(Path("/dev/null")), 20)


def test_index_folder_with_an_odd_name_and_an_index_that_is_a_file(tmp_path: Path, fake_model) -> None:
    photos = tmp_path / "photos"
    _image(photos / "a.png", 1)
    idx = tmp_path / os.fsdecode(b"idx?a#b%\xff")  # URI characters and a byte that is not UTF-8
    assert runner.invoke(app, ["index", str(photos), "--index", str(idx)]).exit_code == 0
    hits = runner.invoke(app, ["search", "a photo", "--index", str(idx), "--json"])
    assert hits.exit_code == 0, hits.output
    assert json.loads(hits.stdout)["path"] == str(photos / "a.png")
    not_a_folder = runner.invoke(app, ["index", str(photos), "--index", str(photos / "a.png")])
    assert not_a_folder.exit_code == 2 and "is a file" in not_a_folder.stderr
