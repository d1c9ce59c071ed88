"""Training end to end on tiny models: losses fall, a resumed run equals an uninterrupted one, two CPU processes
train together, the feature cache changes nothing but speed, checkpoints load for captioning, and recipe
mistakes are one line with exit code 2. Images are coco-mini photos shrunk to 64 px (or generated ones)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from blip2cli.cli import app
from tests.conftest import COCO_MINI

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two threads on two shared cores spin against other jobs; one thread is faster and steadier here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path | int]:
    """A Q-Former tokenizer, a tiny OPT, and a 12-image caption set (COCO format)."""
    from transformers import OPTConfig, OPTForCausalLM

    from tests import tiny

    root = tmp_path_factory.mktemp("train-assets")
    tok = tiny.bert_tokenizer(root / "qtok")
    opt_tok = tiny.opt_tokenizer(root / "opt")
    newline = opt_tok("\n", add_special_tokens=False).input_ids[0]
    config = OPTConfig(vocab_size=len(opt_tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=1,
                       bos_token_id=2, eos_token_id=newline)
    lm = OPTForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large random weights: a frozen LM whose output the visual prefix can steer
        for name, p in lm.named_parameters():
            if "layer_norm" not in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    lm.save_pretrained(root / "opt")

    images = root / "images"
    images.mkdir()
    captions = _photos(images) if COCO_MINI.is_dir() else _generated(images)
    coco = {"images": [{"id": i, "file_name": name} for i, (name, _) in enumerate(captions)],
            "annotations": [{"id": 10 * i + j, "image_id": i, "caption": c}
                            for i, (_, texts) in enumerate(captions) for j, c in enumerate(texts)]}
    (root / "captions.json").write_text(json.dumps(coco))
    one = dict(coco, annotations=[a for a in coco["annotations"] if a["id"] % 10 == 0])
    (root / "one_caption.json").write_text(json.dumps(one))
    return {"root": root, "qtok": root / "qtok", "vocab": len(tok), "opt": root / "opt", "images": images,
            "captions": root / "captions.json", "one_caption": root / "one_caption.json"}


def _photos(folder: Path) -> list[tuple[str, list[str]]]:
    from PIL import Image

    ann = json.loads((COCO_MINI / "annotations" / "captions_train2017.json").read_text())
    by_image: dict[int, list[str]] = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    out = []
    for image in sorted(ann["images"], key=lambda i: i["id"])[:12]:
        with Image.open(COCO_MINI / "train2017" / image["file_name"]) as im:
            im.convert("RGB").resize((64, 64)).save(folder / image["file_name"])
        out.append((image["file_name"], by_image[image["id"]][:5]))
    return out


def _generated(folder: Path) -> list[tuple[str, list[str]]]:
    from PIL import Image, ImageDraw

    colors = ["red", "green", "blue", "yellow", "white", "black"]
    out = []
    for i in range(12):
        im = Image.new("RGB", (64, 64), colors[i % 6])
        ImageDraw.Draw(im).ellipse((8, 8, 40 + 2 * i, 56), fill=colors[(i + 2) % 6])
        name = f"gen{i:02d}.jpg"
        im.save(folder / name)
        out.append((name, [f"a {colors[(i + 2) % 6]} circle on a {colors[i % 6]} background"] * 5))
    return out


def _sets(assets, steps: int, **extra: object) -> list[str]:
    """--set arguments: the tiny recipe on the 12-image set, small and fast."""
    values = {
        "model.qformer.tokenizer": assets["qtok"], "model.qformer.vocab_size": assets["vocab"],
        "model.vision.image_size": 28, "data.train[0].path": assets["captions"],
        "data.train[0].image_root": assets["images"], "data.val[0].path": assets["one_caption"],
        "data.val[0].image_root": assets["images"], "data.val_batches": 2, "train.max_steps": steps,
        "train.warmup_steps": 2, "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.log_every": 1,
        "train.eval_every": 0, "train.save_every": steps, **extra,
    }
    return [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]


def _train(args: list[str]) -> list[dict]:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def _losses(lines: list[dict], key: str = "loss") -> list[float]:
    return [r[key] for r in lines if key in r]


@pytest.fixture(scope="module")
def stage1(assets, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("stage1") / "run"
    lines = _train(["pretrain", "--stage", "1", str(RECIPE), "--out", str(out), "--json",
                    *_sets(assets, 24, **{"train.lr": 2e-3, "train.save_every": 12})])
    return out, lines


def test_stage1_losses_fall_and_outputs_are_complete(stage1):
    out, lines = stage1
    losses = _losses(lines)
    assert len(losses) == 24 and all(set(r) >= {"step", "loss", "itc", "itm", "itg", "lr"} for r in lines[:-1])
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert lines[-1] == {"out": str(out), "step": 24}
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "tb") == [
        "final", "step-00000012", "step-00000024"]
    step = out / "step-00000024"
    for name in ("recipe.yaml", "model.safetensors", "qformer_tokenizer", "optimizer.pt", "rng_state_0.pt",
                 "trainer_state.json"):
        assert (step / name).exists(), name
    assert not (out / "final" / "optimizer.pt").exists()
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 24
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 24


def test_trained_checkpoint_captions_through_the_cli(assets, stage1):
    out, _ = stage1
    image = next(assets["images"].glob("*.jpg"))
    result = runner.invoke(app, ["caption", str(image), "--model", str(out / "final"), "--device", "cpu",
                                 "--max-new-tokens", "5", "--num-beams", "1", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[-1])
    assert record["image"] == str(image) and isinstance(record["caption"], str)


def test_stage1_checkpoint_reloads_the_same_weights(stage1):
    from blip2cli.model.load import load_model
    from blip2cli.model.weights import read_safetensors

    out, _ = stage1
    model = load_model(str(out / "step-00000012"), "cpu", "float32")
    saved = read_safetensors(out / "step-00000012" / "model.safetensors")
    params = dict(model.named_parameters())
    assert "vision.tower.blocks.0.attn.qkv.weight" in saved  # a random tower is saved, or it could not be rebuilt
    assert all(torch.equal(params[k], v) for k, v in saved.items())


def test_stage2_opt_losses_fall(assets, stage1, tmp_path):
    lines = _train(["pretrain", "--stage", "2", str(RECIPE), "--out", str(tmp_path / "s2"), "--json",
                    *_sets(assets, 24, **{"stage": 2, "model.llm.name": assets["opt"], "model.qformer.text": "false",
                                          "model.init": stage1[0] / "final", "model.llm.prompt": "a photo of",
                                          "train.lr": 2e-3})])
    losses = _losses(lines)
    assert len(losses) == 24 and set(lines[0]) >= {"step", "loss", "lr"} and "itc" not in lines[0]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert (tmp_path / "s2" / "final" / "llm_tokenizer").is_dir()


def test_resumed_run_matches_uninterrupted_run(assets, tmp_path):
    """Kill-and-resume (stop at 6, resume to 12) gives the same per-step losses as 12 steps in one go; the eval
    hook runs in between without disturbing the random state."""
    sets = _sets(assets, 12, **{"train.save_every": 3, "train.eval_every": 4, "train.keep_last": 2})
    _train(["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "a"), "--json", *sets])
    first = _train(["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "b"), "--json", *sets,
                    "--max-steps", "6"])
    assert first[-1] == {"out": str(tmp_path / "b"), "step": 6} and not (tmp_path / "b" / "final").exists()
    again = runner.invoke(app, ["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "b"), *sets])
    assert again.exit_code == 2 and "--resume auto" in again.stderr  # never overwrites a run by accident
    _train(["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "b"), "--json", *sets,
            "--resume", "auto"])
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "itc", "itm", "itg", "val_loss", "lr"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-6, (ra, rb)
    assert len(_losses(a, "val_loss")) == 3
    assert sorted(p.name for p in (tmp_path / "b").glob("step-*")) == ["step-00000009", "step-00000012"]


def test_feature_cache_changes_nothing_but_speed(assets, tmp_path, monkeypatch):
    """Without augmentation, cached frozen features give the same losses as running the ViT every time, and
    the second epoch never runs the ViT."""
    from blip2cli.model.vision import VisionEncoder

    towers = []
    forward = VisionEncoder.forward
    monkeypatch.setattr(VisionEncoder, "forward", lambda self, x: towers.append(len(x)) or forward(self, x))
    sets = _sets(assets, 6, **{"data.train[0].path": assets["one_caption"], "data.augment": "false",
                               "train.global_batch_size": 4})
    plain = _train(["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "plain"), "--json", *sets])
    assert towers == [4] * 6  # 3 steps per epoch, 2 epochs
    towers.clear()
    cache = tmp_path / "cache"
    cached = _train(["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "cached"), "--json", *sets,
                     "--set", f"train.feature_cache={cache}"])
    assert towers == [1] + [4] * 3  # a probe for the shape, then epoch 1 only
    assert _losses(plain) == pytest.approx(_losses(cached), abs=1e-6)
    meta = json.loads((cache / "meta.json").read_text())
    assert len(meta["keys"]) == 12 and meta["shape"] == [5, 64]  # 2 x 2 patches + CLS, width 64
    assert (cache / "filled.bin").read_bytes() == b"\x01" * 12  # 2 epochs of 12 images: all cached after the first


def test_two_cpu_processes_train_together(assets, tmp_path):
    """`accelerate launch` with two gloo processes (accelerate 1.15 starts several CPU processes only through its
    multi-process launcher; `--cpu --num_processes 2` alone starts one). One checkpoint, written once."""
    out = tmp_path / "ddp"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29533", "-m", "blip2cli", "pretrain", "--stage", "1", str(RECIPE), "--out", str(out), "--json",
               *_sets(assets, 4, **{"train.global_batch_size": 8, "train.micro_batch_size": 2})]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    assert lines[-1] == {"out": str(out), "step": 4} and len(_losses(lines)) == 4  # only rank 0 prints
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["accumulation"] == 2 and state["samples"] == 32
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000004"]
    assert sorted(p.name for p in (out / "step-00000004").glob("rng_state_*")) == ["rng_state_0.pt", "rng_state_1.pt"]


def _launch_two(args: list[str], port: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(port), "-m", "blip2cli", *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize(("llm", "sharded"), [("opt", "0.08M"), ("t5", "0.12M")])
def test_fsdp_shards_the_frozen_towers_and_changes_nothing_else(assets, tmp_path, llm, sharded):
    """Stage 2 on two gloo processes with `train.fsdp`: each process holds half of every frozen ViT and LLM
    block, gradients flow back through the sharded LLM, and the losses and saved weights (the random ViT gathered
    whole) equal the plain DDP run's."""
    from blip2cli.model.weights import read_safetensors

    name = assets["opt"]
    if llm == "t5":  # 2 + 2 T5 blocks; block 0 of each stack holds the relative position bias
        from transformers import T5Config, T5ForConditionalGeneration

        from tests import tiny

        name = tmp_path / "t5"
        tok = tiny.t5_tokenizer(name)
        T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                            num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0,
                                            eos_token_id=1, decoder_start_token_id=0)).save_pretrained(name)
    sets = _sets(assets, 3, **{"stage": 2, "model.llm.name": name, "model.qformer.text": "false",
                               "model.llm.prompt": "a photo of", "train.global_batch_size": 4,
                               "train.micro_batch_size": 2, "train.lr": 2e-3,
                               **({"model.llm.eos_text": ""} if llm == "t5" else {})})
    runs = {}
    for kind, port in (("ddp", 29541), ("fsdp", 29542)):
        args = ["pretrain", "--stage", "2", str(RECIPE), "--out", str(tmp_path / kind), "--json", *sets,
                "--set", f"train.fsdp={kind == 'fsdp'}"]
        runs[kind] = _launch_two(args, port)
    # ViT 2 x 33,408 weights + OPT 2 x 8,544, or + T5 2 x 10,304 (encoder) + 2 x 14,432 (decoder) + 2 x 128 bias
    assert f"train.fsdp: {sharded} frozen parameters sharded over 2 processes" in runs["fsdp"].stderr
    assert "warning" not in runs["fsdp"].stderr
    losses = {k: _losses([json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]) for k, r in runs.items()}
    assert len(losses["ddp"]) == 3 and losses["fsdp"] == pytest.approx(losses["ddp"], abs=1e-5)
    saved = {k: read_safetensors(tmp_path / k / "final" / "model.safetensors") for k in runs}
    assert "vision.tower.blocks.1.mlp.fc1.weight" in saved["fsdp"] and saved["fsdp"].keys() == saved["ddp"].keys()
    for key, value in saved["ddp"].items():
        assert torch.allclose(saved["fsdp"][key], value, atol=1e-5), key


@pytest.mark.parametrize(("stage", "sets", "message"), [
    ("1", ["train.lrr=1"], "train.lrr: unknown key (did you mean 'lr'?)"),
    ("1", ["train.max_steps=many"], "train.max_steps: expected an integer, got str 'many'"),
    ("1", ["train.precision=fp8"], "train.precision: expected one of 'bf16', 'fp16', 'fp32', got 'fp8'"),
    ("1", ["data.train[0].path=missing/annotations.json"], "data.train[0].path: no such file or folder"),
    ("2", ["stage=2"], "model.llm.name: stage 2 needs the frozen LLM"),  # tiny_cpu.yaml says stage: 1
    ("1", ["train.multi_positive=true", "data.train[0].kind=folder"], "train.multi_positive needs image ids"),
])
def test_recipe_mistakes_are_one_line_and_exit_2(stage, sets, message):
    args = ["pretrain", "--stage", stage, str(RECIPE)] + [a for s in sets for a in ("--set", s)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output and result.stdout == ""


def test_finetune_refuses_a_pretraining_recipe():
    result = runner.invoke(app, ["finetune", str(RECIPE)])
    assert result.exit_code == 2 and "blip2 pretrain --stage 1" in result.stderr


def test_max_steps_beyond_the_schedule_is_refused(assets, tmp_path):
    result = runner.invoke(app, ["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path), "--max-steps",
                                 "99", *_sets(assets, 10)])
    assert result.exit_code == 2 and "--max-steps: expected 1..10" in result.stderr


def test_retrieval_finetune_trains_the_vit_with_layer_decay(assets, stage1, tmp_path):
    sets = _sets(assets, 3, **{"task": "retrieval", "stage": 0, "model.vision.freeze": "false",
                               "model.init": stage1[0] / "final", "train.multi_positive": "true",
                               "train.grad_checkpointing": "true", "train.lr_layer_decay": 0.9})
    lines = _train(["finetune", str(RECIPE), "--out", str(tmp_path / "ft"), "--json", *sets])
    assert lines[-1]["step"] == 3 and all("itc" in r for r in lines[:-1])
    from blip2cli.model.load import load_model

    tuned = load_model(str(tmp_path / "ft" / "final"), "cpu", "float32")
    base = load_model(str(stage1[0] / "final"), "cpu", "float32")
    name = "vision.tower.blocks.1.mlp.fc1.weight"
    assert not torch.equal(dict(tuned.named_parameters())[name], dict(base.named_parameters())[name])


def test_flan_t5_caption_finetune_runs(assets, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from tests import tiny

    t5 = tmp_path / "t5"
    tok = tiny.t5_tokenizer(t5)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                        decoder_start_token_id=0)).save_pretrained(t5)
    sets = _sets(assets, 3, **{"task": "caption", "stage": 0, "model.llm.name": t5, "model.qformer.text": "false",
                               "model.llm.prompt": "a photo of", "model.llm.eos_text": ""})
    lines = _train(["finetune", str(RECIPE), "--out", str(tmp_path / "cap"), "--json", *sets])
    assert lines[-1]["step"] == 3 and all(r["loss"] > 0 for r in lines[:-1])


# ---------------------------------------------------------------------------------------------------------------
# Units: schedule, parameter groups, data order, texts


def test_learning_rate_schedules():
    from blip2cli.config import TrainConfig
    from blip2cli.train.optim import lr_at

    cfg = TrainConfig(lr=1e-4, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg, 1) == pytest.approx(1e-6) and lr_at(5, cfg, 1) == pytest.approx(1e-6 + 99e-6 / 2)
    assert lr_at(10, cfg, 1) == pytest.approx(1e-4) and lr_at(60, cfg, 1) == pytest.approx(5.5e-5)
    assert lr_at(110, cfg, 1) == pytest.approx(1e-5)
    lavis = TrainConfig(lr=1e-4, min_lr=0.0, warmup_lr=1e-8, warmup_steps=4, max_steps=50, schedule="lavis_epoch")
    assert lr_at(2, lavis, 10) == pytest.approx(1e-8 + (1e-4 - 1e-8) / 2) and lr_at(9, lavis, 10) == 1e-4
    assert lr_at(10, lavis, 10) == lr_at(19, lavis, 10) == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi / 5)))
    assert lr_at(49, lavis, 10) > 0  # never reaches min_lr


def test_parameter_groups_decay_and_layer_scales():
    from blip2cli.config import ModelConfig, QFormerConfig, TrainConfig, VisionConfig
    from blip2cli.model.blip2 import Blip2
    from blip2cli.train.optim import param_groups

    vision = VisionConfig(image_size=28, width=32, depth=2, heads=4, mlp_dim=64, freeze=False)
    model = Blip2(ModelConfig(vision=vision, qformer=QFormerConfig(num_queries=4, hidden_size=32, num_layers=2,
                                                                   num_heads=4, intermediate_size=64, vocab_size=50)))
    groups = param_groups(model, TrainConfig(lr_layer_decay=0.5), vit_depth=2)
    where = {n: g for g in groups for n in g["names"]}
    assert where["temp"]["weight_decay"] == 0.05 and where["query_tokens"]["weight_decay"] == 0.05
    assert where["ln_vision.weight"]["weight_decay"] == 0.0 and where["vision_proj.bias"]["weight_decay"] == 0.0
    assert where["vision.tower.blocks.0.attn.q_bias"]["weight_decay"] == 0.0
    assert where["vision.tower.patch_embed.proj.weight"]["lr_scale"] == 0.5 ** 3
    assert where["vision.tower.blocks.0.mlp.fc1.weight"]["lr_scale"] == 0.5 ** 2
    assert where["vision.tower.blocks.1.mlp.fc1.weight"]["lr_scale"] == 0.5
    assert where["qformer.encoder.layer.0.attention.self.query.weight"]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_epoch_plan_splits_ranks_and_resumes_mid_epoch():
    from itertools import islice

    from blip2cli.train.data import EpochPlan

    plans = [EpochPlan([7, 5], [1.0, 2.0], seed=3, micro=2, world=2, rank=r) for r in (0, 1)]
    assert plans[0].per_epoch == 17 and plans[0].batches_per_epoch == 4  # 17 draws, rounds of 4, 1 dropped
    epoch0 = [list(islice(p.batches(0), 4)) for p in plans]
    seen = [item[:2] for rank in epoch0 for batch in rank for item in batch]
    assert len(seen) == 16 and sum(1 for s, _ in seen if s == 1) >= 9  # the weight-2 source appears twice as often
    assert not {b[0][2] for b in epoch0[0]} & {b[0][2] for b in epoch0[1]}  # disjoint draws
    whole = list(islice(plans[0].batches(0), 10))
    assert list(islice(plans[0].batches(6), 4)) == whole[6:]  # resuming at micro-batch 6 (epoch 1) = never stopping
    assert whole[:4] != whole[4:8]  # each epoch reshuffles


def test_text_formats(assets):
    import random

    from blip2cli.train.data import TextFormat

    rng = random.Random(0)
    caption = {"text": "a dog running on the beach"}
    assert TextFormat("qformer")(caption, rng) == {"input": "a dog running on the beach"}
    assert TextFormat("decoder", "a photo of")(caption, rng) == {"input": "a photo of a dog running on the beach"}
    split = TextFormat("seq2seq_split")(caption, rng)
    assert f"{split['input']} {split['output']}" == caption["text"] and 1 <= len(split["input"].split()) <= 3
    prompted = TextFormat("seq2seq_prompt", "a photo of")(caption, rng)
    assert prompted == {"input": "a photo of", "output": caption["text"]}
    question = {"text": "what is the dog doing?", "answers": ["Running"]}
    asked = "Question: what is the dog doing? Answer:"
    assert TextFormat("vqa_decoder", template="Question: {} Answer:")(question, rng) == {
        "input": f"{asked} running", "prompt": asked}
    assert TextFormat("vqa_seq2seq", template="Q: {} A:")(question, rng) == {"input": "Q: what is the dog doing? A:",
                                                                            "output": "running"}


def test_per_sample_prompts_equal_the_batch_prompt_when_they_agree(tiny_opt_dir):
    from blip2cli.model.load import load_model
    from tests import tiny

    model = load_model(str(tiny_opt_dir), "cpu", "float32")
    px, texts = tiny.pixels(2), ["a photo of a dog", "a photo of two cats on a pink blanket"]
    with torch.no_grad():
        ours = model.stage2_loss(px, texts, ["a photo of"] * 2).loss
        reference = model.stage2_loss(px, texts, "a photo of").loss
        other = model.stage2_loss(px, texts, ["a photo", "a photo of two cats"]).loss
    assert abs(float(ours) - float(reference)) < 1e-6 and abs(float(other) - float(reference)) > 1e-4


def test_webdataset_shards_train(assets, tmp_path):
    """Shard streams run endlessly with a nominal epoch of `size` samples."""
    import io

    import webdataset as wds

    captions = json.loads(assets["captions"].read_text())
    files = {i["id"]: i["file_name"] for i in captions["images"]}
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(shards / f"{shard:05d}.tar")) as sink:
            for k, ann in enumerate(captions["annotations"][shard * 6:shard * 6 + 6]):
                buffer = io.BytesIO((assets["images"] / files[ann["image_id"]]).read_bytes())
                sink.write({"__key__": f"{shard:05d}{k:04d}", "jpg": buffer.getvalue(), "txt": ann["caption"]})
    sets = _sets(assets, 5, **{"data.train[0].kind": "webdataset", "data.train[0].path": shards,
                               "data.train[0].image_root": "", "data.train[0].size": 12, "data.val": "[]"})
    lines = _train(["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "wds"), "--json", *sets])
    assert lines[-1]["step"] == 5 and lines[-2]["epoch"] == pytest.approx(10 / 3, abs=1e-3)


def test_vqa_finetune_on_a_decoder_llm(assets, tmp_path):
    """VQA lines train through OPT with each question masked out of the loss; caption files are refused."""
    questions = tmp_path / "vqa.jsonl"
    names = sorted(p.name for p in assets["images"].glob("*.jpg"))
    questions.write_text("".join(json.dumps({"image": n, "question": "What is in the picture?",
                                             "answers": ["a photo", "a photo", "nothing"]}) + "\n" for n in names))
    sets = _sets(assets, 2, **{"task": "vqa", "stage": 0, "model.llm.name": assets["opt"],
                               "model.qformer.text": "false", "data.train[0].kind": "jsonl",
                               "data.train[0].path": questions, "data.val": "[]"})
    lines = _train(["finetune", str(RECIPE), "--out", str(tmp_path / "vqa"), "--json", *sets])
    assert lines[-1]["step"] == 2
    caption_file = ["--set", "data.train[0].kind=coco", "--set", f"data.train[0].path={assets['captions']}"]
    wrong = runner.invoke(app, ["finetune", str(RECIPE), "--out", str(tmp_path / "x"), *sets, *caption_file])
    assert wrong.exit_code == 2 and "data.train: vqa needs jsonl sources" in wrong.stderr


def test_resume_choices(tmp_path):
    from blip2cli.errors import UsageError
    from blip2cli.train.checkpoint import TrainerState, find_resume

    assert find_resume(tmp_path, None) is None and find_resume(tmp_path, "auto") is None
    for step in (3, 12):
        folder = tmp_path / f"step-{step:08d}"
        folder.mkdir()
        TrainerState(step=step).write(folder)
    (tmp_path / ".step-00000015.tmp").mkdir()  # a save that never finished is ignored
    assert find_resume(tmp_path, "auto") == tmp_path / "step-00000012"
    with pytest.raises(UsageError, match="already holds checkpoints"):
        find_resume(tmp_path, None)
    with pytest.raises(UsageError, match="not a step folder"):
        find_resume(tmp_path, str(tmp_path / "step-00000003"))  # no weights in it
