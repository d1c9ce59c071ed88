"""Load images the way users have them: any mode, any orientation, as an 8-bit RGB `PIL.Image`.

Every failure is an `InputError` with one line naming the file ("not an image: ...", "truncated or corrupt
image: ...", "image too large: ...", "not a regular file (a named pipe): ..."), so a caption or index run reports the file and goes on (style rule 10).
No global PIL state is touched: the size limit is ours and is checked per call, and truncated files are
detected by decoding them fully instead of setting `ImageFile.LOAD_TRUNCATED_IMAGES`.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blip2cli.errors import InputError
from blip2cli.files import open_regular

# PIL warns above 89,478,485 pixels and refuses above twice that. We refuse at that same hard limit: a
# 12,000 x 12,000 scan (144 MP) still loads, a 30,000 x 30,000 "image" from a 100 kB file does not.
# Checked on the header, before any pixel is decoded; PIL's own global limit is left as the user set it.
MAX_IMAGE_PIXELS = 178_956_970

STDIN = "-"  # the input name that means "the image bytes on standard input"

# Modes that carry an alpha channel; they are composited over white, as a viewer would show them.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def load_image(path: str | Path) -> Image.Image:
    """Read an image file into 8-bit RGB, upright (EXIF orientation applied)."""
    name = str(path)
    try:
        with open_regular(path) as fp:  # a named pipe, a device, a broken link: one line, never a hang
            if os.fstat(fp.fileno()).st_size == 0:
                raise InputError(f"empty file: {name}")
            return _decode(fp, name)
    except OSError as exc:  # an I/O error on a network disk, ...
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from None


def load_source(source: str | Path) -> Image.Image:
    """`load_image` for any input a user can name: a file, "-" (the bytes on standard input) or an http(s) URL
    (fetched with bounded size and time: data.fetch). Bytes from stdin or a URL get the same checks as a file."""
    from blip2cli.data import fetch

    name = str(source)
    if name == STDIN:
        data = fetch.read_stdin()
        if not data:
            raise InputError("standard input is empty: pipe an image in (cat photo.jpg | blip2 caption -)")
        return load_image_bytes(data, name)
    if fetch.is_url(name):
        return load_image_bytes(fetch.fetch_url(name), name)
    return load_image(source)


def load_image_bytes(data: bytes, name: str) -> Image.Image:
    """The same as `load_image` for bytes already in memory (a WebDataset sample); `name` is used in messages."""
    if not data:
        raise InputError(f"empty file: {name}")
    return _decode(io.BytesIO(data), name)


def _decode(fp: BinaryIO, name: str) -> Image.Image:
    """Open lazily, refuse oversized headers, decode every byte, then convert to upright RGB."""
    try:
        with warnings.catch_warnings():
            # Between PIL's warning and error thresholds the image is within our limit: no warning to show.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
            _check_size(image.size, name)
            image.load()  # raises on truncated data instead of returning a half-grey picture
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(_too_large(_pixels_from_message(str(exc)), name)) from None
    except UnidentifiedImageError:
        raise InputError(f"not an image: {name}") from None
    except Exception as exc:  # PIL plugins raise OSError, SyntaxError, ValueError, struct.error, ... on bad data
        raise InputError(f"truncated or corrupt image: {name} ({_short(exc)})") from None
    return _to_rgb(_upright(image), name)


def _check_size(size: tuple[int, int], name: str) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(_too_large(f"{width}x{height}", name))


def _too_large(pixels: str, name: str) -> str:
    return f"image too large: {pixels} pixels (limit {MAX_IMAGE_PIXELS:,} pixels): {name}"


def _pixels_from_message(message: str) -> str:
    """PIL's bomb error only states the pixel count ("Image size (2500000000 pixels) exceeds ...")."""
    match = re.search(r"\((\d+) pixels\)", message)
    return f"{int(match.group(1)):,}" if match else "too many"


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (phone photos are stored sideways with tag 6 or 8).

    A malformed EXIF block must not cost the user the picture, so it is ignored rather than reported."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. PIL's own `convert("RGB")` clips 16-bit and float data at 255, so those
    are rescaled here; transparency is composited over white instead of dropped (which shows black)."""
    mode = image.mode
    try:
        if mode == "RGB":
            return image
        if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
            return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
        if mode in _ALPHA_MODES or "transparency" in image.info:
            return _over_white(image.convert("RGBA"))
        return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError) as exc:
        raise InputError(f"unsupported image mode {mode}: {name} ({_short(exc)})") from None


def _over_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    """Rescale high-depth single-channel data to 0..255.

    16-bit data (and 32-bit integer data that fits in 16 bits, as older PIL decoded 16-bit PNGs) maps
    65535 -> 255. Float data in [0, 1] maps 1.0 -> 255. Anything else (HDR floats, signed or wide integers)
    is stretched from its own min..max, the only choice that keeps the picture visible."""
    values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 65535.0 * 255.0
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) / (high - low) * 255.0 if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
