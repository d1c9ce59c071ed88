"""Turn command-line INPUT arguments (files, folders, globs) into an ordered list of image paths.

`blip2 caption photos/ extra.png 'scans/**/*.tif'` should do what a shell user expects: folders are walked
recursively in sorted order, hidden files and folders are skipped, globs are expanded by us (so quoting works
on every shell), and each image appears once. A named file is kept whatever its extension: `load_image`
then says whether it is an image. Nothing matching at all is a usage error (exit 2), not an empty run.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from blip2cli.errors import UsageError

# What a folder walk or a glob picks up (compared lower-case, so IMG_0001.JPG counts).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

_GLOB_CHARS = frozenset("*?[")


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Expand files, folders and glob patterns in input order, dropping repeats (same file by any spelling)."""
    seen: set[Path] = set()
    paths: list[Path] = []
    for raw in inputs:
        for path in _expand_one(raw):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def images_in_folder(folder: Path) -> list[Path]:
    """Images under `folder`, recursively, sorted (files of a folder before its subfolders); hidden ones skipped."""
    return [path for path in _walk(folder) if is_image_name(path)]


def _expand_one(raw: str) -> list[Path]:
    path = Path(raw).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = images_in_folder(path)
        if not found:
            raise UsageError(f"no images found in folder {raw}")
        return found
    if _GLOB_CHARS.intersection(raw):
        return _expand_glob(raw)
    if path.exists():  # a device, a socket, a named pipe: reading it could block forever
        raise UsageError(f"not a file or folder: {raw}")
    raise UsageError(f"no such file or folder: {raw}")


def _expand_glob(pattern: str) -> list[Path]:
    """`**` matches any depth; hidden names only match when the pattern spells the dot (Python's glob rule)."""
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    found: list[Path] = []
    for match in map(Path, matches):
        if match.is_dir():
            found.extend(images_in_folder(match))
        elif match.is_file() and is_image_name(match):
            found.append(match)
    if not found:
        raise UsageError(f"no images match {pattern}")
    return found


def _walk(folder: Path) -> Iterator[Path]:
    """os.walk with sorted, non-hidden entries; symlinked folders are not followed (no loops)."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name
