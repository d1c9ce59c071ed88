"""`blip2 capfilt` on tiny offline models: the kept texts are the top K by the scorer's own ITC (recomputed here),
the original text competes, the ITM filter drops exactly the texts under its threshold, the shards train, and a
killed, resumed, re-batched or two-process run writes what one uninterrupted run writes."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.data.transforms import clean_caption

runner = CliRunner()
COLORS = ["red", "green", "blue", "yellow", "white", "black"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 generated images and a JSONL of {image, caption} naming them."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("capfilt-photos")
    rows = []
    for i in range(12):
        im = Image.new("RGB", (40, 40), COLORS[i % 6])
        ImageDraw.Draw(im).ellipse((4, 4, 20 + i, 36), fill=COLORS[(i + 2) % 6])
        im.save(root / f"img{i:02d}.jpg")
        rows.append({"image": f"img{i:02d}.jpg", "caption": f"a {COLORS[(i + 2) % 6]} circle on {COLORS[i % 6]}"})
    (root / "web.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _capfilt(captioner: Path, scorer: Path, inputs: list[str], out: Path, *extra: str) -> list[dict]:
    result = runner.invoke(app, ["capfilt", *inputs, "--out", str(out), "--captioner", str(captioner),
                                 "--scorer", str(scorer), "--device", "cpu", "--json", *extra])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _independent_scores(scorer_dir: Path, image: str, texts: list[str]) -> tuple[list[float], list[float]]:
    """ITC (max over queries) and ITM match probability of each text, computed here from the model alone."""
    from PIL import Image

    from blip2cli.data.transforms import eval_pixels
    from blip2cli.model.load import load_model

    model = load_model(str(scorer_dir), "cpu", "float32")
    px = eval_pixels([Image.open(image).convert("RGB")], model.cfg.vision.image_size, model.cfg.image_mean,
                     model.cfg.image_std)
    with torch.no_grad():
        embeds = model.vision_embeds(px)
        img = model.image_features(embeds)[0]  # (Q, D)
        txt = model.text_features([clean_caption(t) for t in texts])  # (T, D)
        itc = (txt @ img.T).max(dim=1).values
        itm = model.itm_logits(embeds.expand(len(texts), -1, -1), [clean_caption(t) for t in texts]).softmax(-1)[:, 1]
    return itc.tolist(), itm.tolist()


def test_kept_texts_are_the_top_k_by_the_scorers_itc_and_the_original_competes(
        tiny_opt_dir, tiny_retrieval_model_dir, photos, tmp_path):
    out = tmp_path / "kept.jsonl"
    summary = _capfilt(tiny_opt_dir, tiny_retrieval_model_dir, [str(photos / "web.jsonl")], out,
                       "--num-samples", "4", "--keep", "2")[-1]
    assert summary["images"] == 12 and summary["kept"] == 12 and summary["failed"] == []
    records = _records(out)
    assert len(records) == 12
    for record in records[:4]:
        candidates = []
        for text in [record["original"], *record["samples"]]:
            if clean_caption(text) and clean_caption(text) not in map(clean_caption, candidates):
                candidates.append(text)
        itc, _ = _independent_scores(tiny_retrieval_model_dir, record["image"], candidates)
        best = sorted(range(len(candidates)), key=lambda i: (-itc[i], i))[:2]
        assert record["captions"] == [candidates[i] for i in best]
        assert record["scores"] == pytest.approx([itc[i] for i in best], abs=1e-5)
        assert len(record["samples"]) == 4 and record["original"].startswith("a ")

    # keep every text: the original is among them, ranked by its own score
    everything = _capfilt(tiny_opt_dir, tiny_retrieval_model_dir, [str(photos / "web.jsonl")],
                          tmp_path / "all.jsonl", "--num-samples", "4", "--keep", "10")
    assert everything[-1]["images"] == 12
    for record in _records(tmp_path / "all.jsonl"):
        assert record["sources"].count("original") == 1
        assert record["captions"][record["sources"].index("original")] == record["original"]
        assert record["scores"] == sorted(record["scores"], reverse=True)


def test_itm_filter_drops_exactly_the_texts_under_the_threshold(
        tiny_opt_dir, tiny_retrieval_model_dir, photos, tmp_path):
    base = _capfilt(tiny_opt_dir, tiny_retrieval_model_dir, [str(photos / "web.jsonl")], tmp_path / "base.jsonl",
                    "--num-samples", "3", "--keep", "10")
    assert base[-1]["images"] == 12
    first = _records(tmp_path / "base.jsonl")[0]
    _, itm = _independent_scores(tiny_retrieval_model_dir, first["image"], first["captions"])
    ranked = sorted(itm)
    threshold = (ranked[len(ranked) // 2 - 1] + ranked[len(ranked) // 2]) / 2  # half of the first image's survive
    out = tmp_path / "filtered.jsonl"
    summary = _capfilt(tiny_opt_dir, tiny_retrieval_model_dir, [str(photos / "web.jsonl")], out,
                       "--num-samples", "3", "--keep", "10", "--filter", "itm", "--threshold", str(threshold))[-1]
    dropped = 0
    for before, after in zip(_records(tmp_path / "base.jsonl"), _records(out)):
        _, probs = _independent_scores(tiny_retrieval_model_dir, before["image"], before["captions"])
        survivors = [t for t, p in zip(before["captions"], probs) if p >= threshold]
        assert after["captions"] == survivors  # same ITC order, the unmatched ones gone
        assert all(p >= threshold - 1e-6 for p in after["itm"])  # (rounded to 6 decimals in the record)
        dropped += not survivors
    assert summary["dropped"] == dropped and summary["kept"] == 12 - dropped


def test_shards_train_in_stage_1(tiny_opt_dir, tiny_retrieval_model_dir, photos, tmp_path):
    from tests import tiny

    shards = tmp_path / "shards"
    _capfilt(tiny_opt_dir, tiny_retrieval_model_dir, [str(photos / "web.jsonl")], shards, "--num-samples", "2",
             "--shard-size", "5")
    assert sorted(p.name for p in shards.glob("*.tar")) == ["capfilt-00000.tar", "capfilt-00001.tar",
                                                            "capfilt-00002.tar"]
    with tarfile.open(shards / "capfilt-00000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(names[1]).read())
    assert names[0].endswith(".jpg") and names[1].endswith(".json") and len(meta["captions"]) == 2
    tok = tiny.bert_tokenizer(tmp_path / "qtok")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"
    sets = {"model.qformer.tokenizer": tmp_path / "qtok", "model.qformer.vocab_size": len(tok),
            "model.vision.image_size": 28, "data.train[0].kind": "webdataset", "data.train[0].path": shards,
            "data.train[0].image_root": "", "data.train[0].size": 12, "data.val": "[]", "train.max_steps": 2,
            "train.warmup_steps": 1, "train.global_batch_size": 4, "train.micro_batch_size": 4,
            "train.log_every": 1, "train.eval_every": 0, "train.save_every": 2}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    result = runner.invoke(app, ["pretrain", "--stage", "1", str(recipe), "--out", str(tmp_path / "run"), "--json",
                                 *args])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["step"] == 2 and all(r["loss"] > 0 for r in lines if "loss" in r)


def test_samples_do_not_depend_on_the_batch(tiny_opt_dir, tiny_retrieval_model_dir, photos, tmp_path):
    one = tmp_path / "b1.jsonl"
    four = tmp_path / "b4.jsonl"
    _capfilt(tiny_opt_dir, tiny_retrieval_model_dir, [str(photos)], one, "--num-samples", "3", "--batch-size", "1")
    _capfilt(tiny_opt_dir, tiny_retrieval_model_dir, [str(photos)], four, "--num-samples", "3", "--batch-size", "4")
    for a, b in zip(_records(one), _records(four), strict=True):
        assert a["samples"] == b["samples"] and a["original"] is None
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


def _command(captioner: Path, scorer: Path, inputs: list[str], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "blip2cli", "capfilt", *inputs, "--out", str(out), "--captioner", str(captioner),
            "--scorer", str(scorer), "--device", "cpu", "--num-samples", "3", *extra]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_kill_9_and_rerun_equals_an_uninterrupted_run(tiny_opt_dir, tiny_retrieval_model_dir, photos, tmp_path):
    whole, killed = tmp_path / "whole.jsonl", tmp_path / "killed.jsonl"
    args = ["--batch-size", "1", "--max-new-tokens", "30", "--min-new-tokens", "30"]
    subprocess.run(_command(tiny_opt_dir, tiny_retrieval_model_dir, [str(photos)], whole, *args), env=_env(),
                   check=True, capture_output=True, timeout=300)
    job = subprocess.Popen(_command(tiny_opt_dir, tiny_retrieval_model_dir, [str(photos)], killed, *args),
                           env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not killed.is_file() or killed.read_bytes().count(b"\n") < 3):
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    lines_at_kill = killed.read_bytes().count(b"\n")
    assert 3 <= lines_at_kill < 12, "the run was not interrupted mid-way"
    rerun = subprocess.run(_command(tiny_opt_dir, tiny_retrieval_model_dir, [str(photos)], killed, *args, "--json"),
                           env=_env(), check=True, capture_output=True, text=True, timeout=300)
    summary = json.loads(rerun.stdout.splitlines()[-1])
    assert summary["skipped"] == lines_at_kill and summary["images"] == 12 - lines_at_kill
    assert killed.read_text() == whole.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["jsonl", "shards"])
def test_two_processes_write_what_one_writes(tiny_opt_dir, tiny_retrieval_model_dir, photos, tmp_path, kind):
    one, two = (tmp_path / f"{name}.jsonl" if kind == "jsonl" else tmp_path / name for name in ("one", "two"))
    args = ["--shard-size", "4", "--batch-size", "2", "--json"]
    inputs = [str(photos / "web.jsonl")]
    subprocess.run(_command(tiny_opt_dir, tiny_retrieval_model_dir, inputs, one, *args), env=_env(), check=True,
                   capture_output=True, timeout=300)
    jobs = [subprocess.Popen(_command(tiny_opt_dir, tiny_retrieval_model_dir, inputs, two, *args),
                             env=_env(WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [job.communicate(timeout=300) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outputs
    summary = json.loads(outputs[0][0].splitlines()[-1])
    assert summary["images"] == 12 and outputs[1][0] == ""  # rank 0 reports for both
    if kind == "jsonl":
        assert two.read_bytes() == one.read_bytes()
        assert not list(tmp_path.glob("two.jsonl.part-*")) and not list(tmp_path.glob("two.jsonl.done-*"))
    else:
        names = sorted(p.name for p in one.glob("*.tar"))
        assert names == sorted(p.name for p in two.glob("*.tar")) and len(names) == 3
        assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_malformed_shards_are_one_line_each_and_the_rest_goes_on(
        tiny_opt_dir, tiny_retrieval_model_dir, photos, tmp_path):
    jpg = (photos / "img00.jpg").read_bytes()
    shards = tmp_path / "in"
    shards.mkdir()
    _tar(shards / "a.tar", {"000.jpg": jpg, "000.txt": b"a red circle", "../evil.jpg": jpg, "001.jpg": jpg,
                            "002.json": b'{"caption": "no image here"}', "003.jpg": b"not a jpeg", "003.txt": b"x"})
    _tar(shards / "b.tar", {f"{k:03d}.jpg": jpg for k in range(6)})
    data = (shards / "b.tar").read_bytes()
    (shards / "b.tar").write_bytes(data[: len(data) // 2])  # cut inside the fourth member
    out = tmp_path / "out"
    result = runner.invoke(app, ["capfilt", str(shards), "--out", str(out), "--captioner", str(tiny_opt_dir),
                                 "--scorer", str(tiny_retrieval_model_dir), "--device", "cpu", "--num-samples", "2",
                                 "--json"])
    assert result.exit_code == 1, result.output
    err = result.stderr
    assert "Traceback" not in err
    assert err.count("escapes the shard: '../evil.jpg'") == 1
    assert err.count("a.tar#002: no jpg/png/webp image") == 1
    assert err.count("a.tar#001: no json or txt") == 1
    assert err.count("b.tar: truncated") == 1
    assert err.count("a.tar#003:") == 1  # not an image
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["images"] == 2 + 3  # a: 000 and 001; b: the three whole members before the cut
    with tarfile.open(out / "a.tar") as tar:
        metas = [json.loads(tar.extractfile(n).read()) for n in tar.getnames() if n.endswith(".json")]
    assert [m["key"] for m in metas] == ["000", "001"] and metas[0]["original"] == "a red circle"
    assert metas[1]["original"] is None


def test_the_wrong_models_and_changed_settings_are_refused_before_any_work(
        tiny_opt_dir, tiny_retrieval_model_dir, photos, tmp_path):
    out = tmp_path / "x.jsonl"
    result = runner.invoke(app, ["capfilt", str(photos), "--out", str(out), "--captioner", str(tiny_opt_dir),
                                 "--scorer", str(tiny_opt_dir), "--device", "cpu"])
    assert result.exit_code == 2 and "no ITC/ITM heads" in result.output and not out.exists()
    _capfilt(tiny_opt_dir, tiny_retrieval_model_dir, [str(photos)], out, "--num-samples", "2")
    result = runner.invoke(app, ["capfilt", str(photos), "--out", str(out), "--captioner", str(tiny_opt_dir),
                                 "--scorer", str(tiny_retrieval_model_dir), "--device", "cpu", "--num-samples", "3"])
    assert result.exit_code == 2 and "other settings (num_samples: 2 there, 3 now)" in result.output
    result = runner.invoke(app, ["capfilt", str(photos), "--out", str(out), "--keep", "0"])
    assert result.exit_code == 2


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("torchao") is None, reason="torchao is not installed")
def test_another_quantization_is_refused(tiny_opt_dir, tiny_retrieval_model_dir, photos, tmp_path):
    """Issue 15: int8 captions and scores are not mixed into an unquantized run's output (or the reverse)."""
    out = tmp_path / "x.jsonl"
    _capfilt(tiny_opt_dir, tiny_retrieval_model_dir, [str(photos)], out, "--num-samples", "1", "--max-new-tokens", "3")
    result = runner.invoke(app, ["capfilt", str(photos), "--out", str(out), "--captioner", str(tiny_opt_dir),
                                 "--scorer", str(tiny_retrieval_model_dir), "--device", "cpu", "--num-samples", "1",
                                 "--max-new-tokens", "3", "--quantize", "int8"])
    assert result.exit_code == 2 and 'other settings (quantize: "none" there, "int8" now)' in result.output


def _tiny_clip(out: Path) -> Path:
    """A random CLIPModel with a byte-level BPE tokenizer (EOS appended) and CLIP's image processor, saved with
    `save_pretrained` as the openai/clip-* repos are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    from tests.tiny import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=40, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def test_a_clip_scorer_ranks_as_transformers_clip_does(tiny_opt_dir, photos, tmp_path):
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    clip_dir = _tiny_clip(tmp_path / "clip")
    out = tmp_path / "clip.jsonl"
    _capfilt(tiny_opt_dir, clip_dir, [str(photos / "web.jsonl")], out, "--num-samples", "3", "--keep", "2")
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor, tok = CLIPImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir)
    for record in _records(out)[:3]:
        candidates = []
        for text in [record["original"], *record["samples"]]:
            if clean_caption(text) and clean_caption(text) not in map(clean_caption, candidates):
                candidates.append(text)
        with torch.no_grad():
            img = model.get_image_features(**processor(images=Image.open(record["image"]), return_tensors="pt"))
            txt = model.get_text_features(**tok(candidates, padding=True, truncation=True, max_length=40,
                                                  return_tensors="pt"))
        img, txt = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt))
        cos = torch.nn.functional.cosine_similarity(txt, img, dim=-1).tolist()
        best = sorted(range(len(candidates)), key=lambda i: (-cos[i], i))[:2]
        assert record["captions"] == [candidates[i] for i in best]
        assert record["scores"] == pytest.approx([cos[i] for i in best], abs=1e-5)
    result = runner.invoke(app, ["capfilt", str(photos), "--out", str(tmp_path / "f.jsonl"), "--scorer",
                                 str(clip_dir), "--filter", "itm"])
    assert result.exit_code == 2 and "needs an ITM head" in result.output


def test_capfilt_jsonl_reads_as_training_data(tmp_path, photos):
    from blip2cli.data.datasets import read_jsonl

    rows = [{"image": "img00.jpg", "original": "x", "captions": ["a red circle", "a blob"], "scores": [0.3, 0.2]},
            {"image": "img01.jpg", "original": None, "captions": [], "scores": []}]  # all filtered out
    (photos / "capfilt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_jsonl(photos / "capfilt.jsonl", photos)
    assert [r.captions for r in records] == [("a red circle", "a blob")]
