"""CapFilt throughput: `blip2cli.capfilt` against the naive way, same models, same images, same run.

Models: the caption benchmark's mid-size captioner (ViT-B/16, BERT-base Q-Former with 32 queries, OPT-125m-shaped
LLM) and the index benchmark's mid-size retrieval model as the scorer, random weights, saved under .bench/ and
loaded through `load_model`. Per image, N captions are sampled (nucleus, top-p 0.9, 30 new tokens at most):

  capfilt   blip2cli.capfilt.job.capfilt from the files: images decoded ahead, one captioner image pass per
            batch, one sampling run of N rows per image, one scorer image pass shared by the N + 1 texts
  naive     what N separate `blip2 caption --top-p 0.9` calls and a separate scoring pass per text do: per
            sample, the image encoded and one row decoded; per text, the scorer's image features recomputed

Runs alternate (capfilt, naive, ...); medians are reported. fp32 on this CPU.

    .venv/bin/python benchmarks/capfilt_throughput.py --images 4 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))


def main() -> None:
    import caption_throughput
    import index_throughput

    from blip2cli.capfilt.job import CapfiltSettings, capfilt, candidates
    from blip2cli.capfilt.scorers import Blip2Scorer
    from blip2cli.capfilt.sources import read_sources
    from blip2cli.config import GenerationOptions
    from blip2cli.data.images import load_image
    from blip2cli.data.transforms import clean_caption, eval_pixels
    from blip2cli.model.load import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=ROOT / ".bench")
    args = parser.parse_args()

    t0 = time.perf_counter()
    captioner = load_model(str(caption_throughput.build(args.cache / "blip2-opt-mid")), "cpu", "float32")
    scorer = load_model(str(index_throughput.build(args.cache / "blip2-itm-mid")), "cpu", "float32")
    scoring = Blip2Scorer(scorer, need_itm=False)
    files = caption_throughput.photos(args.images, args.cache)
    settings = CapfiltSettings(num_samples=args.samples, captioner="mid", scorer="mid")
    print(f"setup {time.perf_counter() - t0:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(files)} images, {args.samples} samples each")

    def ours() -> list[list[str]]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.jsonl"
            capfilt(captioner, scoring, read_sources([str(f) for f in files]), settings, out,
                    batch_size=args.batch_size)
            return [line for line in out.read_text().splitlines()]

    one = GenerationOptions(num_beams=1, do_sample=True, top_p=0.9, max_new_tokens=30, min_new_tokens=5)

    def naive() -> list[list[str]]:
        kept = []
        for path in files:
            image = load_image(path)
            px = eval_pixels([image], 224, captioner.cfg.image_mean, captioner.cfg.image_std)
            samples = [captioner.generate(px, [""], one)[0][0] for _ in range(args.samples)]  # N caption calls
            texts, _ = candidates(None, samples)
            scores = []
            for text in texts:  # one scoring call per text: the image's features again each time
                img = scorer.image_features(scorer.vision_embeds(px))[0]
                txt = scorer.text_features([clean_caption(text)])[0]
                scores.append(float((img @ txt).max()))
            kept.append(sorted(zip(scores, texts), reverse=True)[: settings.keep])
        return kept

    runs: dict[str, list[float]] = {"capfilt": [], "naive": []}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, fn in (("capfilt", ours), ("naive", naive)):
                t = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - t)
    rate = {k: len(files) / statistics.median(v) for k, v in runs.items()}
    print(f"\n{'':<8} {'img/s':>7} {'s/img':>7}")
    for name in runs:
        print(f"{name:<8} {rate[name]:>7.3f} {1 / rate[name]:>7.2f}")
    print(f"capfilt/naive: {rate['capfilt'] / rate['naive']:.2f}x")
    print(f"total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f} (others share this CPU)")


if __name__ == "__main__":
    main()
