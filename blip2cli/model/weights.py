"""Reading weight files without holding two copies.

safetensors files are memory-mapped copy-on-write and each tensor is a zero-copy view of the mapping, so a
model loaded with `load_state_dict(assign=True)` owns the file's pages instead of a second copy of them.
Pickles go through `torch.load(weights_only=True)` only: anything else is refused.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from blip2cli.errors import UsageError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


MAX_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a .safetensors file as views of one private (copy-on-write) memory map. The header and every
    tensor's offsets are checked against the file size first, so a corrupt file is one UsageError line."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, start = _read_header(f, size, path)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > start else None  # writes stay private
    tensors = {}
    for name, (dtype, shape, lo, hi) in header.items():
        if hi == lo:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=start + lo)
        tensors[name] = flat.view(shape)
    return tensors


def _read_header(f, size: int, path: Path) -> tuple[dict[str, tuple[torch.dtype, list[int], int, int]], int]:
    """The validated header: name -> (dtype, shape, begin, end) relative to the body, and where the body starts."""
    def bad(why: str) -> UsageError:
        return UsageError(f"{path}: not a valid safetensors file: {why}")

    if size < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    header_len = struct.unpack("<Q", f.read(8))[0]
    if header_len > min(size - 8, MAX_HEADER):
        raise bad(f"header length {header_len} runs past the end of the file ({size} bytes)")
    try:
        raw = json.loads(f.read(header_len).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("the header is not UTF-8 JSON") from None
    if not isinstance(raw, dict):
        raise bad(f"the header is a JSON {type(raw).__name__}, not an object")
    body = size - 8 - header_len
    header = {}
    for name, info in raw.items():
        if name == "__metadata__":
            continue
        header[name] = _tensor_entry(name, info, body, bad)
    return header, 8 + header_len


def _tensor_entry(name: str, info: object, body: int, bad) -> tuple[torch.dtype, list[int], int, int]:
    if not isinstance(info, dict):
        raise bad(f"tensor {name}: expected {{dtype, shape, data_offsets}}, got {type(info).__name__}")
    dtype = _DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise bad(f"tensor {name}: unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise bad(f"tensor {name}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise bad(f"tensor {name}: data_offsets {offsets!r} is not two non-negative integers")
    lo, hi = offsets
    if not lo <= hi <= body:
        raise bad(f"tensor {name}: bytes {lo}..{hi} lie outside the {body}-byte body (truncated file?)")
    if (hi - lo) != math.prod(shape) * dtype.itemsize:
        raise bad(f"tensor {name}: shape {shape} needs {math.prod(shape) * dtype.itemsize} bytes, "
                  f"its offsets hold {hi - lo}")
    return dtype, shape, lo, hi


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def release_pages(tensor: Tensor) -> None:
    """Drop the resident pages wholly inside a memory-mapped tensor once it has been consumed (a weight just
    quantized): the mapping is private and never written, so a later read would fault them back in from the
    file. Also hands the quantizer's freed temporaries back to the system (glibc keeps them in its heap
    otherwise: measured 2.1 GiB resident for a 1.2 GiB int8 ViT-g, 1.3 GiB with the trim). Keeps resident
    memory near the quantized model's size while loading. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux") or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    page = mmap.PAGESIZE
    lo = tensor.data_ptr()
    hi = lo + tensor.numel() * tensor.element_size()
    start, end = -(-lo // page) * page, hi // page * page  # inward: never a page shared with a neighbour
    libc = ctypes.CDLL(None, use_errno=True)
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED
    if hasattr(libc, "malloc_trim"):  # glibc
        libc.malloc_trim(0)


def safe_torch_load(path: Path) -> dict:
    """torch.load restricted to tensors and plain containers (weights_only=True), memory-mapped when possible."""
    import pickle

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc).lower()
        if "weights only" not in text or "unsupported operand" in text:  # garbage bytes, not a refused object
            raise UsageError(f"{path}: not a readable PyTorch checkpoint (not a pickle of tensors: corrupt, or "
                             "another format)") from None
        raise UsageError(
            f"{path}: refused to load: this pickle holds objects other than tensors and plain containers, and "
            "loading it could run code; convert it to safetensors with a tool you trust"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse a user's file is that file's fault
        raise UsageError(f"{path}: not a readable PyTorch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def checkpoint_files(directory: Path) -> list[Path]:
    """The weight files of a Hugging Face style directory: sharded or single, safetensors preferred."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            return [directory / s for s in _shards(index)]
        if (directory / single).is_file():
            return [directory / single]
    return []


def _shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{index}: not a valid weight index (expected {{\"weight_map\": {{name: file}}}})") from None
    if not all(isinstance(s, str) and s and "/" not in s and s not in (".", "..") for s in shards):
        raise UsageError(f"{index}: weight_map names files outside its folder")
    return shards


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) over every file, one file's mapping at a time."""
    for path in files:
        if not path.is_file():
            raise UsageError(f"{path}: weight file missing (named by the folder's index)")
        tensors = read_safetensors(path) if path.suffix == ".safetensors" else safe_torch_load(path)
        yield from tensors.items()


def save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write CPU tensors atomically (new file, then rename). Tied copies must be left out by the caller."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata)
    tmp.replace(path)
