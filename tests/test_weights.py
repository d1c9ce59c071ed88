"""Corrupt and hostile weight files: each is one line naming the file, exit 2, never a traceback (issue 10)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.errors import UsageError
from blip2cli.model.weights import read_safetensors, safe_torch_load

runner = CliRunner()


def _file(header: object, body: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + body


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
VARIANTS = {  # name -> (file bytes, what the message says)
    "empty": (b"", "shorter than the 8-byte header length"),
    "4 bytes": (b"\x01\x02\x03\x04", "shorter than the 8-byte header length"),
    "garbage header": (_file(b"\xff\xfe\x00garbage\x80"), "not UTF-8 JSON"),
    "non-JSON header": (_file(b"{this is not json"), "not UTF-8 JSON"),
    "list header": (_file([1, 2, 3]), "a JSON list, not an object"),
    "header length beyond the file": (_file(GOOD, bytes(16), length=10_000), "runs past the end of the file"),
    "header length 2^62": (_file(GOOD, bytes(16), length=1 << 62), "runs past the end of the file"),
    "offsets beyond the file": (_file({"w": {**GOOD["w"], "data_offsets": [0, 1 << 40]}}, bytes(16)), "outside"),
    "negative offsets": (_file({"w": {**GOOD["w"], "data_offsets": [-16, 0]}}, bytes(16)), "non-negative integers"),
    "ill-typed offsets": (_file({"w": {**GOOD["w"], "data_offsets": ["0", "16"]}}, bytes(16)), "non-negative"),
    "shape/size mismatch": (_file({"w": {**GOOD["w"], "shape": [3, 3]}}, bytes(16)), "needs 36 bytes"),
    "truncated body": (_file(GOOD, bytes(10)), "truncated file?"),
}


@pytest.mark.parametrize("case", VARIANTS)
def test_corrupt_safetensors_are_one_usage_error(tmp_path: Path, case: str) -> None:
    data, message = VARIANTS[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(UsageError, match="not a valid safetensors file") as info:
        read_safetensors(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_valid_file_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    path.write_bytes(_file(GOOD, struct.pack("<4f", 1, 2, 3, 4)))
    assert read_safetensors(path)["w"].tolist() == [[1, 2], [3, 4]]


def one_line(result, code: int = 2) -> str:
    """The CLI contract: the exit code, no traceback, one line of output."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("case", VARIANTS)
def test_corrupt_model_folder_through_the_cli(tmp_path: Path, tiny_opt_dir: Path, case: str) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_opt_dir, model)
    (model / "model.safetensors").write_bytes(VARIANTS[case][0])
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    result = runner.invoke(app, ["caption", str(image), "--model", str(model), "--device", "cpu"])
    assert "model.safetensors: not a valid safetensors file" in one_line(result)


def test_corrupt_weight_index_is_one_line(tmp_path: Path, tiny_opt_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_opt_dir, model)
    (model / "model.safetensors.index.json").write_text("{not json")
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    result = runner.invoke(app, ["caption", str(image), "--model", str(model), "--device", "cpu"])
    assert "not a valid weight index" in one_line(result)


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_code_is_refused_in_one_line_of_our_own(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": {"query_tokens": torch.zeros(1)}, "x": _Payload()}, path)
    with pytest.raises(UsageError) as info:
        safe_torch_load(path)
    message = str(info.value)
    assert "refused" in message and "convert it to safetensors" in message
    assert "weights_only" not in message and "\n" not in message and len(message) < 300
    Image.new("RGB", (32, 32), "red").save(tmp_path / "x.png")
    result = runner.invoke(app, ["caption", str(tmp_path / "x.png"), "--model", str(path), "--device", "cpu"])
    assert "refused" in one_line(result)


@pytest.mark.parametrize("data", [b"", b"garbage bytes that are no pickle", b"PK\x03\x04broken zip"])
def test_unreadable_pth_is_one_line(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(data)
    with pytest.raises(UsageError, match="not a readable PyTorch checkpoint") as info:
        safe_torch_load(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("recipe,message", [("model: [unclosed", "not valid YAML"),
                                            ("model:\n  vision:\n    heads: 0\n", "model.vision.heads: expected")])
def test_a_run_folder_with_a_broken_recipe_is_one_line(tmp_path: Path, recipe: str, message: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe)
    (run / "model.safetensors").write_bytes(_file(GOOD, bytes(16)))
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    result = runner.invoke(app, ["caption", str(tmp_path / "a.png"), "--model", str(run), "--device", "cpu"])
    line = one_line(result)
    assert "recipe.yaml" in line and message in line


def test_a_lavis_file_whose_model_holds_no_tensors_is_one_line(tmp_path: Path) -> None:
    torch.save({"model": {"query_tokens": "not a tensor"}}, tmp_path / "odd.pth")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    result = runner.invoke(app, ["caption", str(tmp_path / "a.png"), "--model", str(tmp_path / "odd.pth"),
                                 "--device", "cpu"])
    assert "'query_tokens' under 'model' is not a tensor" in one_line(result)
