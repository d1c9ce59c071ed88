"""What the training tests share: the tiny recipe, a 12-image caption set with a tiny OPT and Q-Former tokenizer
(`assets`, built once per session), and helpers that run `blip2` training commands. Images are coco-mini photos
shrunk to 64 px (or generated ones)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from blip2cli.cli import app

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"
runner = CliRunner()


def build_assets(root: Path, coco_mini: Path) -> dict[str, Path | int]:
    """A Q-Former tokenizer, a tiny OPT, and a 12-image caption set (COCO format) in `root`."""
    from transformers import OPTConfig, OPTForCausalLM

    from tests import tiny

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
    captions = _photos(images, coco_mini) if coco_mini.is_dir() else _generated(images)
    coco = {"images": [{"id": i, "file_name": name} for i, (name, _) in enumerate(captions)],
            "annotations": [{"id": 10 * i + j, "image_id": i, "caption": c}
                            for i, (_, texts) in enumerate(captions) for j, c in enumerate(texts)]}
    (root / "captions.json").write_text(json.dumps(coco))
    one = dict(coco, annotations=[a for a in coco["annotations"] if a["id"] % 10 == 0])
    (root / "one_caption.json").write_text(json.dumps(one))
    return {"root": root, "qtok": root / "qtok", "vocab": len(tok), "opt": root / "opt", "images": images,
            "captions": root / "captions.json", "one_caption": root / "one_caption.json"}


def _photos(folder: Path, coco_mini: Path) -> list[tuple[str, list[str]]]:
    from PIL import Image

    ann = json.loads((coco_mini / "annotations" / "captions_train2017.json").read_text())
    by_image: dict[int, list[str]] = {}
    for a in ann["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    out = []
    for image in sorted(ann["images"], key=lambda i: i["id"])[:12]:
        with Image.open(coco_mini / "train2017" / image["file_name"]) as im:
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


def sets_for(assets, steps: int, **extra: object) -> list[str]:
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


def run_cli(args: list[str]) -> list[dict]:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def losses_of(lines: list[dict], key: str = "loss") -> list[float]:
    return [r[key] for r in lines if key in r]
