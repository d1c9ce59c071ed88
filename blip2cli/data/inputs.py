"""Turn command-line INPUT arguments (files, folders, globs) into an ordered list of image paths.

`blip2 caption photos/ extra.png 'scans/**/*.tif'` should do what a shell user expects: folders are walked
recursively in sorted order, hidden files and folders are skipped, globs are expanded by us (so quoting works
on every shell), and each image appears once. A named file is kept whatever its extension: `load_image`
then says whether it is an image. Nothing matching at all is a usage error (exit 2), not an empty run.

Folders and globs give every entry with an image name that is not a folder, whatever it is: a broken or looping
symlink, a named pipe or a device is kept, and reading it (`files.open_regular`) reports it as one failed input
while the rest go on. A named INPUT that is none of file, folder or glob is a usage error.

`expand_sources` (caption, ask) also takes "-", the image bytes on standard input, and http(s) URLs, kept as given
(`images.load_source` reads them); another scheme (ftp://, file://) is a usage error.
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
    seen: set[str] = set()
    paths: list[Path] = []
    for raw in inputs:
        for path in _expand_one(raw):
            key = path_key(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def expand_sources(inputs: Sequence[str]) -> list[str]:
    """`expand_inputs` plus "-" (standard input) and http(s) URLs, in input order, each once."""
    from blip2cli.data.fetch import is_url, url_scheme

    seen: set[str] = set()
    sources: list[str] = []
    for raw in inputs:
        if raw == "-" or is_url(raw):
            if raw == "-":
                check_stdin()
            found = [raw]
        elif url_scheme(raw) is not None and not Path(raw).exists():
            raise UsageError(f"unsupported URL scheme {url_scheme(raw)}://: only http:// and https:// are fetched: {raw}")
        else:
            found = [str(path) for path in _expand_one(raw)]
        for source in found:
            key = source_key(source)
            if key not in seen:
                seen.add(key)
                sources.append(source)
    return sources


def check_stdin() -> None:
    """A usage error for "-" when standard input is a terminal: the image must be piped in."""
    import sys

    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("-: standard input is a terminal; pipe an image in, e.g. cat photo.jpg | blip2 caption -")


def source_key(source: str | Path) -> str:
    """What identifies an input: a URL and "-" as spelled, a file by `path_key`."""
    from blip2cli.data.fetch import is_url

    text = str(source)
    return text if text == "-" or is_url(text) else path_key(text)


def path_key(path: str | Path) -> str:
    """The absolute, symlink-free spelling that identifies a file (os.path.realpath, not Path.resolve(), which
    raises on a symlink loop)."""
    return os.path.realpath(os.path.expanduser(path))


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
    if path.is_symlink():
        raise UsageError(f"broken or looping symlink: {raw}")
    if raw == "-" or "://" in raw:  # caption and ask take these (expand_sources); index and capfilt read files
        raise UsageError(f"not a file or folder: {raw} (this command reads local files only)")
    raise UsageError(f"no such file or folder: {raw}")


def _expand_glob(pattern: str) -> list[Path]:
    """`**` matches any depth; hidden names only match when the pattern spells the dot (Python's glob rule)."""
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    found: list[Path] = []
    for match in map(Path, matches):
        if match.is_dir():
            found.extend(images_in_folder(match))
        elif is_image_name(match):  # a file, or a broken link or a pipe that reading reports (as the walk does)
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
