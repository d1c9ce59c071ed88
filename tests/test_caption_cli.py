"""`blip2 caption` through the CLI on tiny offline models: outputs, exit codes, resume, images as users have them."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.model.blip2 import Blip2

runner = CliRunner()


def caption(*args: str, model: Path, input: str | None = None):
    return runner.invoke(app, ["caption", *args, "--model", str(model), "--device", "cpu"], input=input)


def json_lines(stdout: str) -> list[dict]:
    """Every stdout line is one JSON object (nothing else may be there under --json)."""
    return [json.loads(line) for line in stdout.splitlines()]


def _image(path: Path, color=(200, 30, 30), size=(40, 30), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, **save)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    for i, color in enumerate(["red", "green", "blue"]):
        _image(folder / f"p{i}.png", color)
    return folder


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record what the model is asked to generate (the real generate still runs)."""
    seen: list[dict] = []
    original = Blip2.generate

    def recording(self, pixels, prompts, options):
        seen.append({"n": pixels.shape[0], "prompts": list(prompts), "options": options})
        return original(self, pixels, prompts, options)

    monkeypatch.setattr(Blip2, "generate", recording)
    return seen


# ---------------------------------------------------------------------------------------------------------------
# Outputs


def test_captions_on_stdout_one_line_each_when_piped(tiny_opt_dir: Path, photos: Path) -> None:
    result = caption(str(photos), model=tiny_opt_dir)  # CliRunner's stdout is not a terminal: a pipe
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [Path(line.split("\t")[0]).name for line in lines] == ["p0.png", "p1.png", "p2.png"]
    assert all(line.count("\t") == 1 for line in lines) and "p0.png" not in result.stderr


def test_json_one_line_per_image_in_order(tiny_opt_dir: Path, photos: Path, calls: list[dict]) -> None:
    result = caption(str(photos), "--json", model=tiny_opt_dir)
    assert result.exit_code == 0, result.output
    records = json_lines(result.stdout)
    assert [Path(r["image"]).name for r in records] == ["p0.png", "p1.png", "p2.png"]
    assert all(set(r) == {"image", "caption"} and isinstance(r["caption"], str) for r in records)
    o = calls[0]["options"]  # the paper's caption decoding; min_length 8 counts BOS: 7 new tokens (LAVIS configs)
    assert (o.num_beams, o.max_new_tokens, o.min_new_tokens, o.do_sample) == (5, 30, 7, False)
    assert calls[0]["prompts"] == ["", "", ""]


def test_num_captions(tiny_opt_dir: Path, photos: Path) -> None:
    result = caption(str(photos / "p0.png"), "--json", "--num-captions", "3", model=tiny_opt_dir)
    assert result.exit_code == 0, result.output
    (record,) = json_lines(result.stdout)
    assert len(record["captions"]) == 3 and record["caption"] == record["captions"][0]


def test_prompt_is_continued_and_not_printed_unless_asked(tiny_opt_dir: Path, photos: Path, calls) -> None:
    plain = caption(str(photos / "p0.png"), "--json", "--prompt", "a photo of", model=tiny_opt_dir)
    kept = caption(str(photos / "p0.png"), "--json", "--prompt", "a photo of", "--keep-prompt", model=tiny_opt_dir)
    assert plain.exit_code == kept.exit_code == 0
    assert calls[0]["prompts"] == ["a photo of"]
    from transformers import AutoTokenizer

    prompt_tokens = len(AutoTokenizer.from_pretrained(tiny_opt_dir)("a photo of").input_ids)  # BOS included
    assert calls[0]["options"].min_new_tokens == max(8 - prompt_tokens, 0)  # OPT-2.7B: 8 - 4 = 4 (LAVIS configs)
    assert json_lines(kept.stdout)[0]["caption"] == "a photo of " + json_lines(plain.stdout)[0]["caption"]


def test_generation_flags(tiny_opt_dir: Path, photos: Path, calls: list[dict]) -> None:
    image = str(photos / "p0.png")
    assert caption(image, "--num-beams", "2", "--max-new-tokens", "5", model=tiny_opt_dir).exit_code == 0
    assert caption(image, "--top-p", "0.5", "--seed", "1", model=tiny_opt_dir).exit_code == 0
    assert caption(image, "--sample", "--temperature", "0.7", model=tiny_opt_dir).exit_code == 0
    assert caption(image, "--num-captions", "7", "--min-new-tokens", "2", model=tiny_opt_dir).exit_code == 0
    beams, top_p, temp, many = (c["options"] for c in calls)
    assert (beams.num_beams, beams.max_new_tokens, beams.min_new_tokens) == (2, 5, 5)  # default min capped at max
    assert (top_p.do_sample, top_p.num_beams, top_p.top_p, top_p.temperature) == (True, 1, 0.5, 1.0)
    assert (temp.do_sample, temp.top_p, temp.temperature) == (True, 0.9, 0.7)
    assert (many.num_beams, many.num_return_sequences, many.min_new_tokens) == (7, 7, 2)


def test_flan_t5_captions(tiny_t5_dir: Path, photos: Path, calls: list[dict]) -> None:
    result = caption(str(photos), "--json", model=tiny_t5_dir)
    assert result.exit_code == 0, result.output
    assert len(json_lines(result.stdout)) == 3
    assert calls[0]["options"].min_new_tokens == 7  # T5: min_length counts the decoder start token


def test_stage1_model_captions_with_the_qformer(tiny_retrieval_model_dir: Path, photos: Path, calls) -> None:
    result = caption(str(photos), "--json", "--prompt", "a photo of", model=tiny_retrieval_model_dir)
    assert result.exit_code == 0, result.output
    records = json_lines(result.stdout)
    assert len(records) == 3 and all(isinstance(r["caption"], str) for r in records)
    o = calls[0]["options"]  # LAVIS Blip2Qformer.generate: 3 beams, max_length 30, min_length 10 with [DEC]
    assert (o.num_beams, o.max_new_tokens, o.min_new_tokens) == (3, 29, 9)
    assert "--prompt is ignored" in result.stderr


def test_batches_and_decoding_in_background(tiny_opt_dir: Path, tmp_path: Path, calls, monkeypatch) -> None:
    import threading

    from blip2cli.data import images

    folder = tmp_path / "many"
    for i in range(5):
        _image(folder / f"{i}.png", (i * 40, 0, 0))
    (folder / "3.png").write_bytes(b"not a png")
    threads = []
    load = images.load_image
    monkeypatch.setattr(images, "load_image", lambda p: threads.append(threading.current_thread().name) or load(p))
    result = caption(str(folder), "--json", "--batch-size", "2", model=tiny_opt_dir)
    assert result.exit_code == 1
    assert [c["n"] for c in calls] == [2, 1, 1]  # the unreadable image leaves its batch one short
    assert len(threads) == 5 and all(name.startswith("blip2-decode") for name in threads)
    assert "captioning" in result.stderr  # a progress bar for more than a handful of images, on stderr


def test_real_photos(tiny_opt_dir: Path, coco_mini: Path) -> None:
    photos = sorted((coco_mini / "val2017").glob("*.jpg"))[:3]
    result = caption(*map(str, photos), "--json", model=tiny_opt_dir)
    assert result.exit_code == 0, result.output
    records = json_lines(result.stdout)
    assert [r["image"] for r in records] == [str(p) for p in photos]
    assert all(isinstance(r["caption"], str) for r in records)


# ---------------------------------------------------------------------------------------------------------------
# --out: append, flush, resume


def test_out_resume_skips_done_images(tiny_opt_dir: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "caps.jsonl"
    first = caption(str(photos), "--out", str(out), "--json", model=tiny_opt_dir)
    assert first.exit_code == 0 and len(json_lines(out.read_text())) == 3
    again = caption(str(photos), "--out", str(out), "--json", model=tiny_opt_dir)
    assert again.exit_code == 0 and again.stdout == "" and "3 of 3 images already captioned" in again.stderr
    _image(photos / "p3.png", "white")
    third = caption(str(photos), "--out", str(out), "--json", model=tiny_opt_dir)
    assert [Path(r["image"]).name for r in json_lines(third.stdout)] == ["p3.png"]
    assert [Path(r["image"]).name for r in json_lines(out.read_text())] == ["p0.png", "p1.png", "p2.png", "p3.png"]


def test_out_after_a_kill_mid_line_and_failures_are_retried(tiny_opt_dir: Path, photos: Path, tmp_path) -> None:
    out = tmp_path / "caps.jsonl"
    done = json.dumps({"image": str(photos / "p0.png"), "caption": "x"})
    failed = json.dumps({"image": str(photos / "p1.png"), "error": "was unreadable"})
    out.write_text(f"{done}\n{failed}\n" + '{"image": "p2.pn')  # killed while writing the third line
    result = caption(str(photos), "--out", str(out), "--json", model=tiny_opt_dir)
    assert result.exit_code == 0
    assert [Path(r["image"]).name for r in json_lines(result.stdout)] == ["p1.png", "p2.png"]
    lines = out.read_text().splitlines()  # the cut-off line is dropped, never glued to the next record
    # p1's error record is replaced by its caption (issue #10: a failure that now succeeds replaces its record)
    assert [Path(json.loads(x)["image"]).name for x in lines] == ["p0.png", "p1.png", "p2.png"]
    assert not any("error" in json.loads(x) for x in lines)


def test_ctrl_c_keeps_what_was_written(tiny_opt_dir: Path, photos: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "caps.jsonl"
    original, count = Blip2.generate, []

    def interrupted_on_second_batch(self, *args):
        count.append(1)
        if len(count) == 2:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Blip2, "generate", interrupted_on_second_batch)
    result = caption(str(photos), "--out", str(out), "--batch-size", "1", "--json", model=tiny_opt_dir)
    assert result.exit_code == 130
    assert "interrupted; 1 records are saved" in result.stderr and "Traceback" not in result.output
    assert [Path(r["image"]).name for r in json_lines(out.read_text())] == ["p0.png"]
    monkeypatch.setattr(Blip2, "generate", original)
    resumed = caption(str(photos), "--out", str(out), "--json", model=tiny_opt_dir)
    assert [Path(r["image"]).name for r in json_lines(resumed.stdout)] == ["p1.png", "p2.png"]


# ---------------------------------------------------------------------------------------------------------------
# Images as users have them


def _png_bomb(path: Path) -> Path:
    """A PNG header claiming 50,000 x 50,000 pixels with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


def _odd_images(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """Good images of every awkward kind, and bad files with the start of the message each must produce."""
    exif = Image.Exif()
    exif[0x0112] = 6  # phone photo stored sideways
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    good = [
        _image(folder / "phone.jpg", size=(60, 20), exif=exif.tobytes()),
        _image(folder / "mes photos d'été" / "plage à midi 🌊.png"),
        folder / "depth16.png", folder / "icon.png", folder / "cmyk.jpg", folder / "grey_alpha.png", folder / "bw.bmp",
    ]  # fmt: skip
    Image.fromarray(np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (8, 1))).save(good[2])
    palette.save(good[3], transparency=0)
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(good[4])
    Image.new("LA", (8, 8), (50, 128)).save(good[5])
    Image.new("1", (8, 8), 1).save(good[6])
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.png").touch()
    (folder / "notes.jpg").write_text("shopping list: milk, eggs\n")
    bad = {
        _png_bomb(folder / "bomb.png"): "image too large",
        folder / "cut.jpg": "truncated or corrupt image",
        folder / "empty.png": "empty file",
        folder / "notes.jpg": "not an image",
    }
    return good, bad


def test_every_odd_image_kind(tiny_opt_dir: Path, tmp_path: Path) -> None:
    good, bad = _odd_images(tmp_path / "odd")
    result = caption(str(tmp_path / "odd"), "--json", model=tiny_opt_dir)
    assert result.exit_code == 1
    records = {r["image"]: r for r in json_lines(result.stdout)}
    assert set(records) == {str(p) for p in good + list(bad)}
    for path in good:
        assert isinstance(records[str(path)]["caption"], str), records[str(path)]
    for path, message in bad.items():
        assert records[str(path)]["error"].startswith(message) and str(path) in records[str(path)]["error"]
    assert "4 of 11 images failed" in result.stderr


def test_failures_are_one_line_each_in_the_table_view(tiny_opt_dir: Path, tmp_path: Path) -> None:
    _, bad = _odd_images(tmp_path / "odd")
    result = caption(str(tmp_path / "odd"), model=tiny_opt_dir)
    assert result.exit_code == 1 and all(Path(line.split("\t")[0]) not in bad for line in result.stdout.splitlines())
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == len(bad) and "Traceback" not in result.output
    assert "phone.jpg" in result.stdout  # the good ones are still captioned


# ---------------------------------------------------------------------------------------------------------------
# Usage errors: one line, exit 2, before the model loads


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/nope.png"], "no such file or folder"),
        (["{tmp}/empty_folder"], "no images found in folder"),
        (["{tmp}/*.webp"], "no images match"),
        (["{photos}", "--sample", "--num-beams", "3"], "--num-beams"),
        (["{photos}", "--top-p", "1.5"], "--top-p"),
        (["{photos}", "--temperature", "0"], "--temperature"),
        (["{photos}", "--num-captions", "6", "--num-beams", "2"], "--num-captions"),
        (["{photos}", "--min-new-tokens", "9", "--max-new-tokens", "4"], "--min-new-tokens"),
        (["{photos}", "--num-beams", "0"], "--num-beams"),
        (["{photos}", "--out", "{tmp}"], "--out"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str, tiny_opt_dir: Path, photos: Path, tmp_path: Path) -> None:
    (tmp_path / "empty_folder").mkdir()
    args = [a.format(tmp=tmp_path, photos=photos) for a in args]
    result = caption(*args, model=tiny_opt_dir)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.stdout == ""


def test_unknown_model_or_device_exit_2(tiny_opt_dir: Path, photos: Path, tmp_path: Path) -> None:
    result = caption(str(photos), model=tmp_path / "no-model-here")
    assert result.exit_code == 2 and "no such model" in result.stderr
    result = runner.invoke(app, ["caption", str(photos), "--model", str(tiny_opt_dir), "--device", "tpu9"])
    assert result.exit_code == 2 and "--device" in result.stderr and "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------------------------
# Resumable logs that tell the truth (issue #10)


def test_out_refuses_other_settings(tiny_opt_dir: Path, photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "caps.jsonl"
    assert caption(str(photos), "--out", str(out), model=tiny_opt_dir).exit_code == 0
    for changed in (["--prompt", "a photo of"], ["--num-beams", "2"], ["--max-new-tokens", "4"]):
        result = caption(str(photos), "--out", str(out), *changed, model=tiny_opt_dir)
        assert result.exit_code == 2 and "other settings" in result.stderr, result.output
    assert len(out.read_text().splitlines()) == 3


def test_reruns_over_broken_files_add_nothing(tiny_opt_dir: Path, photos: Path, tmp_path: Path) -> None:
    for n in range(3):
        (photos / f"broken{n}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "caps.jsonl"
    assert caption(str(photos), "--out", str(out), model=tiny_opt_dir).exit_code == 1
    first = out.read_text()
    assert len(first.splitlines()) == 6
    again = caption(str(photos), "--out", str(out), "--json", model=tiny_opt_dir)
    assert again.exit_code == 1 and len(json_lines(again.stdout)) == 3  # the failures are reported again
    assert out.read_text() == first  # ... but not written again
