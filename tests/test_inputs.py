"""expand_inputs: files, folders and globs -> ordered, de-duplicated image paths; nothing found is a usage error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blip2cli.data.inputs import expand_inputs
from blip2cli.errors import UsageError


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    _touch(
        tmp_path / "photos",
        "b.jpg", "a.PNG", "notes.txt", "c.webp", ".hidden.jpg",
        "sub/d.JPEG", "sub/e.tif", ".cache/f.jpg", "sub/.thumbs/g.jpg", "z/h.gif",
    )  # fmt: skip
    return tmp_path / "photos"


def _names(paths: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def test_folder_is_recursed_sorted_images_only_hidden_skipped(photos: Path) -> None:
    found = expand_inputs([str(photos)])
    assert _names(found, photos) == ["a.PNG", "b.jpg", "c.webp", "sub/d.JPEG", "sub/e.tif", "z/h.gif"]


def test_input_order_kept_and_duplicates_removed(photos: Path) -> None:
    found = expand_inputs([str(photos / "b.jpg"), str(photos), f"{photos}/./b.jpg"])
    assert _names(found, photos) == ["b.jpg", "a.PNG", "c.webp", "sub/d.JPEG", "sub/e.tif", "z/h.gif"]


def test_named_file_with_other_extension_is_kept(photos: Path) -> None:
    assert expand_inputs([str(photos / "notes.txt")]) == [photos / "notes.txt"]


def test_glob_patterns(photos: Path) -> None:
    assert _names(expand_inputs([f"{photos}/*.jpg"]), photos) == ["b.jpg"]
    assert _names(expand_inputs([f"{photos}/**/*.tif"]), photos) == ["sub/e.tif"]
    # like the shell: glob is case-sensitive, hidden names need an explicit dot, non-images are dropped
    assert _names(expand_inputs([f"{photos}/**/*.jp*g"]), photos) == ["b.jpg"]
    assert _names(expand_inputs([f"{photos}/**/*.*"]), photos) == ["a.PNG", "b.jpg", "c.webp", "sub/d.JPEG",
                                                                   "sub/e.tif", "z/h.gif"]  # fmt: skip
    assert _names(expand_inputs([f"{photos}/s*"]), photos) == ["sub/d.JPEG", "sub/e.tif"]  # a matched folder


def test_relative_paths_stay_relative(photos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(photos.parent)
    assert expand_inputs(["photos/*.webp", "photos/sub"]) == [
        Path("photos/c.webp"), Path("photos/sub/d.JPEG"), Path("photos/sub/e.tif"),
    ]  # fmt: skip


def test_unicode_and_spaces(tmp_path: Path) -> None:
    _touch(tmp_path, "vacances d'été/plage 1.jpg")
    assert expand_inputs([str(tmp_path / "vacances d'été")]) == [tmp_path / "vacances d'été" / "plage 1.jpg"]


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="^no such file or folder: .*missing.jpg$"):
        expand_inputs([str(tmp_path / "missing.jpg")])


def test_empty_folder_and_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _touch(tmp_path, "docs/readme.md", "docs/.secret.jpg")
    for name in ("empty", "docs"):
        with pytest.raises(UsageError, match=f"^no images found in folder .*{name}$"):
            expand_inputs([str(tmp_path / name)])


def test_glob_matching_nothing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"^no images match .*\*\.png$"):
        expand_inputs([f"{tmp_path}/*.png"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")
def test_named_pipe_is_refused_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(UsageError, match="^not a file or folder: "):
        expand_inputs([str(tmp_path / "pipe.jpg")])
