"""Training throughput: stage 1 with and without the frozen-feature cache, and stage 2 through a small OPT.

The model is BLIP-2's layout at reduced size with random weights (no download): "mid" is a ViT-B/16-like
frozen encoder (width 768, 12 blocks, 12 heads, patch 16, 224 px: 197 tokens) with a BERT-base-wide Q-Former of
6 layers and 32 queries; "vitg-ratio" keeps BLIP-2's cost ratio of frozen tower to Q-Former (see CONFIGS);
stage 2 adds an OPT-125m-shaped frozen LLM (12 layers, 768 wide, 50272 vocab). Data: 32 coco-mini
photos with one caption each (generated images when coco-mini is absent), augmentation off so the cache
applies, micro-batch = global batch = 8, fp32 on CPU (bf16 on a GPU).

1. End to end: each configuration trains two epochs through the real loop (`blip2cli.train.loop.run`, data
   loading, optimizer and logging included), logging once per epoch; samples/s comes from metrics.jsonl.
   Epoch 1 fills the cache, epoch 2 reads it.
2. Step anatomy, on one micro-batch in the training process (medians of --repeats, after a warm-up): the frozen
   ViT's forward, a plain step (forward + backward from pixels) and a cached step (from stored features). The
   encoder's share is ViT / plain step. On a shared CPU the end-to-end figures vary with the other jobs' load;
   the step anatomy alternates plain and cached steps so both see the same load.

    .venv/bin/python benchmarks/train_throughput.py --threads 1   # about 6 minutes on a shared 2-core CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"
N_IMAGES, MICRO = 16, 8


def assets(folder: Path) -> dict[str, Path]:
    """Tokenizers, the OPT-125m-shaped LLM and the caption set, built once under .bench/train/."""
    from blip2cli import tiny

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "qtok" / "tokenizer.json").is_file():
        tiny.bert_tokenizer(folder / "qtok")
    if not (folder / "opt" / "config.json").is_file():
        from transformers import OPTConfig, OPTForCausalLM

        tok = tiny.opt_tokenizer(folder / "opt")
        newline = tok("\n", add_special_tokens=False).input_ids[0]
        config = OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                           num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768,
                           pad_token_id=1, bos_token_id=2, eos_token_id=newline)  # fmt: skip
        OPTForCausalLM(config).save_pretrained(folder / "opt")
    captions = folder / f"captions-{N_IMAGES}.json"
    if not captions.is_file():
        _caption_set(folder, captions)
    return {"qtok": folder / "qtok", "opt": folder / "opt", "captions": captions, "images": folder / "images"}


def _caption_set(folder: Path, captions: Path) -> None:
    from PIL import Image

    images = folder / "images"
    images.mkdir(exist_ok=True)
    rows = []
    if COCO_MINI.is_dir():
        ann = json.loads((COCO_MINI / "annotations" / "captions_train2017.json").read_text())
        first = {}
        for a in ann["annotations"]:
            first.setdefault(a["image_id"], a["caption"])
        for image in sorted(ann["images"], key=lambda i: i["id"])[:N_IMAGES]:
            shutil.copy(COCO_MINI / "train2017" / image["file_name"], images / image["file_name"])
            rows.append((image["file_name"], first[image["id"]]))
    else:
        for i in range(N_IMAGES):
            Image.new("RGB", (640, 480), (i * 7 % 256, i * 13 % 256, i * 29 % 256)).save(images / f"{i}.jpg")
            rows.append((f"{i}.jpg", f"a photo number {i}"))
    coco = {"images": [{"id": i, "file_name": f} for i, (f, _) in enumerate(rows)],
            "annotations": [{"id": i, "image_id": i, "caption": c} for i, (_, c) in enumerate(rows)]}
    captions.write_text(json.dumps(coco))


# (vision tower, Q-Former) per configuration. "mid" is the ViT-B / 6-layer BERT-base pair; "vitg-ratio" keeps
# BLIP-2's proportions (ViT-g's forward costs about 2x a stage-1 Q-Former step per image, so the frozen tower is
# ~2/3 of a step) at a size a CPU runs: a 24-block ViT-B-wide tower and a 384-wide 6-layer Q-Former.
CONFIGS = {
    "mid": ({"width": 768, "depth": 12, "heads": 12, "mlp_dim": 3072},
            {"hidden_size": 768, "num_layers": 6, "num_heads": 12, "intermediate_size": 3072}),
    "vitg-ratio": ({"width": 768, "depth": 24, "heads": 12, "mlp_dim": 3072},
                   {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "intermediate_size": 1536}),
}


def recipe(a: dict[str, Path], stage: int, cache: Path | None, epochs: int, config: str = "mid"):
    from blip2cli.config import Recipe, from_dict

    vision, qformer = CONFIGS[config]
    steps_per_epoch = N_IMAGES // MICRO
    model = {
        "vision": {"weights": "", "image_size": 224, "patch_size": 16, **vision},
        "qformer": {**qformer, "vocab_size": 128, "tokenizer": str(a["qtok"]), "text": stage == 1},
        "llm": {"name": str(a["opt"])} if stage == 2 else {},
    }
    train = {"lr": 1e-4, "min_lr": 1e-5, "warmup_lr": 1e-6, "warmup_steps": 1, "max_steps": epochs * steps_per_epoch,
             "global_batch_size": MICRO, "micro_batch_size": MICRO, "log_every": steps_per_epoch,
             "save_every": epochs * steps_per_epoch, "feature_cache": str(cache) if cache else "", "seed": 0}
    data = {"train": [{"kind": "coco", "path": str(a["captions"]), "image_root": str(a["images"])}],
            "augment": False, "num_workers": 0}
    return from_dict(Recipe, {"task": "pretrain", "stage": stage, "model": model, "data": data, "train": train})


def train(r, out: Path) -> list[float]:
    """samples/s of each epoch, from metrics.jsonl."""
    from blip2cli.train.loop import run

    shutil.rmtree(out, ignore_errors=True)
    run(r, out)
    speeds = [json.loads(line)["samples_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out)  # the checkpoints hold the random ViT: hundreds of MB
    return speeds


def step_anatomy(r, repeats: int) -> dict[str, float]:
    """Median seconds of the frozen ViT forward, a plain step and a cached step on one micro-batch."""
    from blip2cli.train.data import build_train_data
    from blip2cli.train.feature_cache import CachedVision
    from blip2cli.train.loop import Objective, build_for_training

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = build_for_training(r, "bfloat16" if cuda else "float32").to(device)
    batch = next(build_train_data(r, False, 0, 1, 0).batches()).to(device)
    objective = Objective(model, r)
    with torch.no_grad():
        features = model.vision(batch.pixels)
    model.vision = CachedVision(model.vision)  # features pass through, as with train.feature_cache

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def step(images) -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=cuda):
            loss = objective(dataclasses.replace(batch, pixels=images))["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"vit": [], "plain": [], "cached": []}
    for i in range(repeats + 1):
        vit = timed(lambda: model.vision.inner(batch.pixels))
        plain = timed(lambda: step(batch.pixels))
        cached = timed(lambda: step(features))
        if i:  # the first round warms up allocators and kernels
            times["vit"].append(vit)
            times["plain"].append(plain)
            times["cached"].append(cached)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / ".bench" / "train")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    a = assets(args.work)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}; {N_IMAGES} images, micro-batch {MICRO}", flush=True)
    results = {}
    for name, stage, config in (("stage 1, mid", 1, "mid"), ("stage 1, vitg-ratio", 1, "vitg-ratio"),
                                ("stage 2, mid + OPT-125m", 2, "mid")):
        cache = args.work / "cache"
        plain = train(recipe(a, stage, None, 2, config), args.work / "plain")
        cached = train(recipe(a, stage, cache, 2, config), args.work / "cached")
        shutil.rmtree(cache, ignore_errors=True)
        anatomy = step_anatomy(recipe(a, stage, None, 2, config), args.repeats)
        results[name] = {"plain_samples_per_s": plain, "cached_samples_per_s": cached,
                         "e2e_speedup_epoch2": round(cached[1] / plain[1], 2),
                         **{f"{k}_s": round(v, 3) for k, v in anatomy.items()},
                         "step_speedup": round(anatomy["plain"] / anatomy["cached"], 2),
                         "encoder_share": round(anatomy["vit"] / anatomy["plain"], 3)}
        print(json.dumps({"config": name, **results[name]}), flush=True)
    print("\nconfig                     epoch-2 samples/s: plain -> cached   | one step: plain  cached   frozen ViT")
    for name, r in results.items():
        print(f"{name:26s} {r['plain_samples_per_s'][1]:6.2f} -> {r['cached_samples_per_s'][1]:6.2f} "
              f"({r['e2e_speedup_epoch2']:.2f}x) | {r['plain_s']:6.2f}s {r['cached_s']:6.2f}s "
              f"({r['step_speedup']:.2f}x)"
              f"  {r['vit_s']:.2f}s = {100 * r['encoder_share']:.0f}%")


if __name__ == "__main__":
    main()
