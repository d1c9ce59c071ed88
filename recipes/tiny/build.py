"""Build the data that recipes/tiny_cpu.yaml trains on, offline: 120 drawn 64 px images (a coloured shape on a
plain background), three captions each in COCO caption format, and a WordPiece BERT tokenizer trained on those
captions. The files are shipped in this folder; rerun this to rebuild them (same captions and tokenizer):

    python recipes/tiny/build.py            # writes recipes/tiny/{images/, captions_*.json, tokenizer/}
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "ring")
SIZES = {"small": 14, "large": 26}  # half-widths in pixels on a 64 px canvas
CANVAS = 64
VAL = 24  # images held out for validation; the other 96 train


def scenes() -> list[dict[str, str]]:
    """Every (size, colour, shape, background) with background != colour, in a seeded order; 120 of them."""
    rng = random.Random(0)
    every = [{"size": z, "color": c, "shape": s, "background": b}
             for z in SIZES for c in COLORS for s in SHAPES for b in COLORS if b != c]
    rng.shuffle(every)
    return every[:120]


def captions(scene: dict[str, str]) -> list[str]:
    z, c, s, b = scene["size"], scene["color"], scene["shape"], scene["background"]
    return [f"a {z} {c} {s} on a {b} background", f"a {c} {s} against a plain {b} background",
            f"a picture of a {z} {s} in {c} on {b}"]


def draw(scene: dict[str, str], rng: random.Random):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (CANVAS, CANVAS), COLORS[scene["background"]])
    r = SIZES[scene["size"]]
    x, y = rng.randint(r + 2, CANVAS - r - 2), rng.randint(r + 2, CANVAS - r - 2)
    box, fill, pen = (x - r, y - r, x + r, y + r), COLORS[scene["color"]], ImageDraw.Draw(image)
    if scene["shape"] == "circle":
        pen.ellipse(box, fill=fill)
    elif scene["shape"] == "square":
        pen.rectangle(box, fill=fill)
    elif scene["shape"] == "triangle":
        pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    else:
        pen.ellipse(box, outline=fill, width=max(3, r // 3))
    return image


def coco(rows: list[tuple[str, dict[str, str]]], first_id: int) -> dict:
    images = [{"id": first_id + i, "file_name": name, "width": CANVAS, "height": CANVAS}
              for i, (name, _) in enumerate(rows)]
    annotations = [{"id": 10 * (first_id + i) + j, "image_id": first_id + i, "caption": text}
                   for i, (_, scene) in enumerate(rows) for j, text in enumerate(captions(scene))]
    return {"images": images, "annotations": annotations}


def tokenizer(texts: list[str], out: Path) -> int:
    """A lowercase WordPiece BERT tokenizer ([PAD]=0, [UNK], [CLS], [SEP], [MASK]) with [DEC] as bos_token, as the
    Q-Former expects; returns its size (the recipe's model.qformer.vocab_size must be at least this). The vocabulary
    is written out rather than trained (the trainer's ids vary between runs): the specials, every caption word,
    then single letters and digits with their ## continuations, so any other ASCII word still tokenizes."""
    import string

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    words = sorted({w for t in texts for w in t.lower().split()})
    chars = [*string.ascii_lowercase, *string.digits]
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *(c for c in chars if c not in words),
              *(f"##{c}" for c in chars), *string.punctuation]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=64)
    fast.add_special_tokens({"bos_token": "[DEC]"})
    fast.save_pretrained(out)
    return len(fast)


def build(out: Path = HERE) -> int:
    """Write images/, captions_train.json, captions_val.json and tokenizer/ under `out`; returns the vocab size."""
    rng = random.Random(1)
    images = out / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    rows = []
    for i, scene in enumerate(scenes()):
        name = f"{i:03d}.png"
        draw(scene, rng).quantize(colors=8).save(images / name, optimize=True)  # a few hundred bytes each
        rows.append((name, scene))
    train, val = rows[VAL:], rows[:VAL]
    for split, part, first in (("train", train, 1), ("val", val, 1 + len(train))):
        (out / f"captions_{split}.json").write_text(json.dumps(coco(part, first), indent=1) + "\n")
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    return tokenizer([t for _, scene in rows for t in captions(scene)], out / "tokenizer")


if __name__ == "__main__":
    print(f"wrote {HERE}: 120 images, captions_train.json, captions_val.json, tokenizer/ ({build()} tokens)")
