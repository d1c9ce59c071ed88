"""load_image: every odd mode becomes upright 8-bit RGB; every bad file becomes one InputError line."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip2cli.data.images import MAX_IMAGE_PIXELS, load_image, load_image_bytes
from blip2cli.errors import InputError


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (1-bit grey) with one tiny IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_rgb_jpeg_round_trip(tmp_path: Path) -> None:
    image = load_image(_save(Image.new("RGB", (40, 30), (200, 10, 10)), tmp_path / "red.jpg"))
    assert image.mode == "RGB" and image.size == (40, 30)
    assert abs(image.getpixel((5, 5))[0] - 200) <= 3


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = _save(Image.new("RGB", (60, 20), "white"), tmp_path / "phone.jpg", exif=exif.tobytes())
    assert load_image(path).size == (20, 60)


def test_sixteen_bit_png_scales_instead_of_clipping(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    path = _save(Image.fromarray(values), tmp_path / "depth16.png")
    assert Image.open(path).mode == "I;16"
    pixels = np.asarray(load_image(path))
    assert pixels.shape == (1, 4, 3)
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255]


def test_sixteen_bit_gradient_is_monotone(tmp_path: Path) -> None:
    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (4, 1))
    pixels = np.asarray(load_image(_save(Image.fromarray(gradient), tmp_path / "grad.png")))[0, :, 1].astype(int)
    assert pixels[0] == 0 and pixels[-1] == 255 and np.all(np.diff(pixels) >= 0)
    assert abs(pixels[32] - round(32 / 63 * 255)) <= 1


def test_float_image_in_unit_range(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)), tmp_path / "float.tif")
    assert np.asarray(load_image(path))[0, :, 2].tolist() == [0, 128, 255]


def test_int32_image_outside_16_bits_is_stretched(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32)), tmp_path / "wide.tif")
    assert np.asarray(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_palette_with_transparency_is_composited_over_white(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    image.putpixel((0, 0), 1)
    path = _save(image, tmp_path / "icon.png", transparency=0)
    loaded = load_image(path)
    assert loaded.getpixel((1, 1)) == (255, 255, 255)  # transparent black -> white, not black
    assert loaded.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_over_white(tmp_path: Path, mode: str) -> None:
    image = Image.new(mode, (4, 4), (0, 0) if mode == "LA" else (0, 0, 0, 0))
    image.putpixel((0, 0), (0, 255) if mode == "LA" else (0, 0, 255, 255))
    loaded = load_image(_save(image, tmp_path / f"alpha_{mode}.png"))
    assert loaded.getpixel((2, 2)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == ((0, 0, 0) if mode == "LA" else (0, 0, 255))


def test_half_transparent_pixel_blends_with_white(tmp_path: Path) -> None:
    path = _save(Image.new("RGBA", (2, 2), (0, 0, 0, 128)), tmp_path / "half.png")
    assert all(abs(c - 127) <= 1 for c in load_image(path).getpixel((0, 0)))


@pytest.mark.parametrize(
    "mode, suffix, color",
    [("L", ".png", 100), ("1", ".png", 1), ("CMYK", ".jpg", (0, 255, 255, 0)), ("YCbCr", ".jpg", (76, 85, 255))],
)
def test_other_modes_become_rgb(tmp_path: Path, mode: str, suffix: str, color) -> None:
    loaded = load_image(_save(Image.new(mode, (16, 16), color), tmp_path / f"x_{mode}{suffix}"))
    assert loaded.mode == "RGB" and loaded.size == (16, 16)
    if mode == "CMYK":  # no cyan, full magenta + yellow = red
        r, g, b = loaded.getpixel((8, 8))
        assert r > 200 and g < 60 and b < 60


def test_unicode_and_spaces_in_path(tmp_path: Path) -> None:
    folder = tmp_path / "mes photos d'été"
    folder.mkdir()
    path = _save(Image.new("RGB", (8, 8)), folder / "plage à midi 🌊.png")
    assert load_image(str(path)).size == (8, 8)


def test_decompression_bomb_refused_from_header(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(50_000, 50_000))
    with pytest.raises(InputError, match=r"^image too large: .* pixels \(limit 178,956,970 pixels\)"):
        load_image(path)


def test_own_limit_holds_when_pil_limit_is_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user (or another library) may set PIL's global limit to None; ours still applies, with the size."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(InputError, match=r"image too large: 50000x50000 pixels"):
        load_image_bytes(_png_header(50_000, 50_000), "bomb.png")


def test_limit_constant_is_pils_hard_limit() -> None:
    assert MAX_IMAGE_PIXELS == 2 * 89_478_485


def test_truncated_jpeg(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputError, match="^truncated or corrupt image: .*cut.jpg"):
        load_image(path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").touch()
    with pytest.raises(InputError, match="^empty file: .*empty.jpg$"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(InputError, match="^empty file: x$"):
        load_image_bytes(b"", "x")


def test_text_file_named_jpg(tmp_path: Path) -> None:
    (tmp_path / "notes.jpg").write_text("shopping list: milk, eggs\n")
    with pytest.raises(InputError, match="^not an image: .*notes.jpg$"):
        load_image(tmp_path / "notes.jpg")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="^no such file: .*nope.png$"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="^not an image \\(a folder\\): "):
        load_image(tmp_path)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 0 does not stop root (tests may run as root in containers), so the OS refusal is simulated."""
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "secret.png")

    real_open = os.open

    def refuse(name, *args, **kwargs):  # the loader opens with os.open (non-blocking: a named pipe never hangs)
        if str(name) == str(path):
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(InputError, match="^cannot read \\(permission denied\\): .*secret.png$"):
        load_image(path)


def test_bytes_loader_applies_the_same_rules() -> None:
    buffer = io.BytesIO()
    Image.new("LA", (3, 3), (0, 0)).save(buffer, "PNG")
    assert load_image_bytes(buffer.getvalue(), "s#1").getpixel((1, 1)) == (255, 255, 255)
    with pytest.raises(InputError, match="^not an image: s#2$"):
        load_image_bytes(b"<html>404</html>", "s#2")
