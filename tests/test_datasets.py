"""Datasets: annotation files, caption folders and synthetic WebDataset shards -> cleaned samples; bad images skip."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import pytest
from PIL import Image

from blip2cli.config import DataSource
from blip2cli.data.datasets import (
    ImageTextDataset,
    SkippedSampleWarning,
    build_dataset,
    shard_urls,
)
from blip2cli.errors import UsageError

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"


def _jpeg(color: tuple[int, int, int] = (10, 200, 30), size: tuple[int, int] = (16, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def _images(root: Path, *names: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(_jpeg())


def _write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Annotation files and folders


def test_coco_caption_file(tmp_path: Path) -> None:
    _images(tmp_path / "train2017", "000000000009.jpg", "000000000025.jpg")
    ann = _write_json(tmp_path / "captions.json", {
        "images": [{"id": 9, "file_name": "000000000009.jpg"}, {"id": 25, "file_name": "000000000025.jpg"}],
        "annotations": [{"image_id": 9, "id": 1, "caption": "A Plate of FOOD."},
                        {"image_id": 9, "id": 2, "caption": "Dinner: rice; beans"},
                        {"image_id": 25, "id": 3, "caption": "A giraffe!"}],
    })  # fmt: skip
    dataset = build_dataset(DataSource("coco", str(ann), image_root=str(tmp_path / "train2017")))
    assert len(dataset) == 3
    sample = dataset[1]
    assert sample["text"] == "dinner rice beans" and sample["image_id"] == 9
    assert sample["image"].mode == "RGB" and sample["path"].endswith("000000000009.jpg")
    assert [dataset[i]["image_id"] for i in range(3)] == [9, 9, 25]


def test_lavis_json_string_ids_share_an_index_and_lists_are_sampled(tmp_path: Path) -> None:
    _images(tmp_path / "img", "a.jpg", "b.jpg")
    ann = _write_json(tmp_path / "ann.json", [
        {"image": "a.jpg", "caption": "First caption.", "image_id": "coco_1"},
        {"image": "b.jpg", "caption": ["Top one", "Top two"], "image_id": "coco_2"},
        {"image": "a.jpg", "caption": "Second caption", "image_id": "coco_1"},
    ])  # fmt: skip
    dataset = build_dataset(DataSource("lavis_json", str(ann), image_root=str(tmp_path / "img")))
    assert [dataset[i]["image_id"] for i in range(3)] == [0, 1, 0]
    assert {dataset[1]["text"] for _ in range(40)} == {"top one", "top two"}


def test_jsonl_captions_with_int_ids_and_default_image_root(tmp_path: Path) -> None:
    _images(tmp_path, "x.jpg", "y.jpg")
    lines = [{"image": "x.jpg", "caption": "An X.", "image_id": 70},
             {"image": "y.jpg", "caption": "A Y", "image_id": 7}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    dataset = build_dataset(DataSource("jsonl", str(tmp_path / "train.jsonl")))
    assert [(dataset[i]["text"], dataset[i]["image_id"]) for i in range(2)] == [("an x", 70), ("a y", 7)]


def test_jsonl_questions(tmp_path: Path) -> None:
    _images(tmp_path, "x.jpg")
    line = {"image": "x.jpg", "question": "What colour is it?", "answers": ["green", "green", "lime"]}
    (tmp_path / "vqa.jsonl").write_text(json.dumps(line) + "\n")
    sample = build_dataset(DataSource("jsonl", str(tmp_path / "vqa.jsonl")))[0]
    assert sample["text"] == "what colour is it?" and sample["answers"] == ["green", "green", "lime"]


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    _images(tmp_path, "x.jpg")
    (tmp_path / "bad.jsonl").write_text('{"image": "x.jpg", "caption": "ok"}\n{"image": "x.jpg"}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl line 2: missing 'caption'$"):
        build_dataset(DataSource("jsonl", str(tmp_path / "bad.jsonl")))
    (tmp_path / "broken.jsonl").write_text('{"image": \n')
    with pytest.raises(UsageError, match=r"broken.jsonl line 1: not valid JSON"):
        build_dataset(DataSource("jsonl", str(tmp_path / "broken.jsonl")))


def test_wrong_image_root_fails_early(tmp_path: Path) -> None:
    ann = _write_json(tmp_path / "ann.json", [{"image": "a.jpg", "caption": "c"}])
    with pytest.raises(UsageError, match=r"image not found: .*a.jpg \(is image_root"):
        build_dataset(DataSource("lavis_json", str(ann), image_root=str(tmp_path / "nowhere")))


def test_folder_with_sidecars(tmp_path: Path) -> None:
    _images(tmp_path / "pics", "cat.jpg", "dog.jpg", "nocaption.jpg")
    (tmp_path / "pics" / "cat.txt").write_text("A Cat.\n")
    (tmp_path / "pics" / "dog.txt").write_text("a dog\nA puppy!\n")
    with pytest.warns(SkippedSampleWarning, match="1 images .* have no caption"):
        dataset = build_dataset(DataSource("folder", str(tmp_path / "pics")))
    assert len(dataset) == 2 and dataset[0]["text"] == "a cat"
    assert {dataset[1]["text"] for _ in range(40)} == {"a dog", "a puppy"}
    assert [dataset[i]["image_id"] for i in range(2)] == [0, 1]


def test_bad_image_is_skipped_with_a_warning(tmp_path: Path) -> None:
    _images(tmp_path, "good.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    rows = [{"image": "good.jpg", "caption": "g"}, {"image": "bad.jpg", "caption": "b"}]
    ann = _write_json(tmp_path / "ann.json", rows)
    dataset = build_dataset(DataSource("lavis_json", str(ann)))
    with pytest.warns(SkippedSampleWarning, match="skipping sample: not an image: .*bad.jpg"):
        sample = dataset[1]
    assert sample["text"] == "g"  # the next good record (wrapping around)


def test_data_source_rejects_nonsense() -> None:
    with pytest.raises(UsageError, match="weight"):
        DataSource("coco", "x.json", weight=0)


@pytest.mark.skipif(not COCO_MINI.is_dir(), reason="coco-mini not present (../shared/data/coco-mini)")
def test_coco_mini_real_photos() -> None:
    spec = DataSource("coco", str(COCO_MINI / "annotations" / "captions_train2017.json"), str(COCO_MINI / "train2017"))
    dataset = build_dataset(spec)
    assert isinstance(dataset, ImageTextDataset) and len(dataset) == 400
    sample = dataset[0]
    assert sample["image"].mode == "RGB" and min(sample["image"].size) > 100
    assert sample["text"] == sample["text"].lower() and "." not in sample["text"] and sample["text"]
    assert isinstance(sample["image_id"], int)


# ---------------------------------------------------------------------------------------------------------------
# WebDataset shards


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """3 shards x 3 samples: txt captions, json caption lists, one corrupt JPEG (key 000010001)."""
    import webdataset as wds

    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(3):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for index in range(3):
                key = f"{shard:05d}{index:04d}"
                sample = {"__key__": key, "jpg": b"\xff\xd8garbage" if key == "000010001" else _jpeg()}
                if shard == 2:
                    sample["json"] = json.dumps({"captions": ["Top A.", "Top B!"]}).encode()
                else:
                    sample["txt"] = f"Caption {key}."
                sink.write(sample)
    return folder


def _collect(spec: DataSource) -> tuple[list[dict], list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(build_dataset(spec))
    return samples, [w for w in caught if issubclass(w.category, SkippedSampleWarning)]


def test_shards_stream_skips_the_corrupt_sample(shards: Path) -> None:
    samples, skipped = _collect(DataSource("webdataset", str(shards), shuffle=0))
    assert len(samples) == 8 and len(skipped) == 1
    assert "000010001" in str(skipped[0].message)
    first = samples[0]
    assert first["text"] == "caption 000000000" and first["image_id"] == 0 and first["image"].mode == "RGB"
    assert first["path"].endswith("00000.tar#000000000")
    assert {s["text"] for s in samples[-3:]} <= {"top a", "top b"}


def test_shuffled_stream_keeps_every_good_sample(shards: Path) -> None:
    samples, _ = _collect(DataSource("webdataset", str(shards), shuffle=4))
    assert len(samples) == 8 and len({s["path"] for s in samples}) == 8


def test_shard_patterns(shards: Path) -> None:
    assert len(shard_urls(str(shards))) == 3
    assert shard_urls(f"{shards}/{{00000..00001}}.tar") == [f"{shards}/00000.tar", f"{shards}/00001.tar"]
    assert len(shard_urls(f"{shards}/*.tar")) == 3
    with pytest.raises(UsageError, match="no such shard"):
        shard_urls(f"{shards}/{{00000..00007}}.tar")


def test_split_by_node_gives_each_rank_its_own_shards(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    samples, _ = _collect(DataSource("webdataset", str(shards), shuffle=0))
    assert {s["path"].split("#")[0][-9:] for s in samples} == {"00001.tar"}


def test_resampled_stream_is_endless(shards: Path) -> None:
    stream = iter(build_dataset(DataSource("webdataset", str(shards), resampled=True, shuffle=0, size=6)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedSampleWarning)
        assert len([next(stream) for _ in range(20)]) == 20


def test_tar_member_names_never_touch_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile shard with '../' member names is read in memory; nothing is written next to or above it."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    with tarfile.open(work / "evil.tar", "w") as tar:
        for name, data in [("../../escaped.jpg", _jpeg()), ("../../escaped.txt", b"escape")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.chdir(work)
    before = sorted(p for p in tmp_path.rglob("*"))
    samples, _ = _collect(DataSource("webdataset", str(work / "evil.tar"), shuffle=0))
    assert [s["text"] for s in samples] == ["escape"]
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_empty_caption_list_and_broken_coco(tmp_path: Path) -> None:
    _images(tmp_path, "a.jpg")
    ann = _write_json(tmp_path / "ann.json", [{"image": "a.jpg", "caption": []}])
    with pytest.raises(UsageError, match="empty 'caption' list for image a.jpg"):
        build_dataset(DataSource("lavis_json", str(ann)))
    coco = _write_json(tmp_path / "coco.json", {"images": [{"id": 1}], "annotations": []})
    with pytest.raises(UsageError, match=r"coco.json images\[0\]: missing 'file_name'"):
        build_dataset(DataSource("coco", str(coco)))
