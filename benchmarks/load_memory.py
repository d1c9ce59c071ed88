"""Peak resident memory while loading a ~1B-parameter BLIP-2 checkpoint, against its size on disk.

    python benchmarks/load_memory.py            # ViT-g/14 + BERT-base Q-Former retrieval model, ~1.1B params
    python benchmarks/load_memory.py --small    # a quick run on a narrower model
    python benchmarks/load_memory.py --quantize int8   # ours with the ViT's linear layers in int8 (torchao)

A random checkpoint in Hugging Face format (Blip2ForImageTextRetrieval layout, safetensors, fp32) is written once
under .bench/. Each measurement runs in a fresh process and reads its own peak RSS (VmHWM, which counts
memory-mapped file pages once touched; ru_maxrss would inherit the parent's peak across exec): after imports
(baseline), after loading, and after one forward pass that touches every weight. transformers'
`from_pretrained` on the same files is measured the same way as the baseline
implementation. Target (issue #2): our peak while loading <= 1.25x the checkpoint's size on disk.
With --quantize int8 (issue #15) each linear layer is quantized as it streams from the mapped file and its fp32
pages are dropped; the target is a peak <= 1.25x the quantized model's own size (int8 layers, fp32 rest).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(out: Path, small: bool) -> Path:
    """Random weights for every tensor of the HF model, written without building the model for real."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    vision = dict(hidden_size=704, intermediate_size=3072, num_hidden_layers=12) if small else {}
    config = Blip2Config(vision_config=vision, qformer_config=Blip2QFormerConfig(vocab_size=30523,
                         use_qformer_text_input=True).to_dict(), architectures=["Blip2ForImageTextRetrieval"])
    with init_empty_weights():
        model = Blip2ForImageTextRetrieval(config)
    g = torch.Generator().manual_seed(0)
    state = {n: torch.randn(p.shape, generator=g) * 0.02 for n, p in model.state_dict().items()
             if not n.endswith("position_ids")}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    sys.path.insert(0, str(ROOT))
    from blip2cli.tiny import bert_tokenizer

    bert_tokenizer(out)
    AutoTokenizer.from_pretrained(out)  # sanity
    return out


PROBE = r"""
import json, sys, torch, transformers
import blip2cli.model.load as L
def rss():  # peak RSS of this address space (ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
which, path, quantize = sys.argv[1], sys.argv[2], sys.argv[3]
base = rss()
size = None
if which == "ours":
    m = L.load_model(path, "cpu", "float32", quantize=quantize)
    loaded = rss()
    from blip2cli.model.quantize import quantized_bytes
    size = quantized_bytes(m)
    with torch.no_grad():
        e = m.vision_embeds(torch.randn(1, 3, m.cfg.vision.image_size, m.cfg.vision.image_size))
        m.itm_logits(e, ["a photo"])
else:
    m = transformers.Blip2ForImageTextRetrieval.from_pretrained(path, dtype=torch.float32)
    loaded = rss()
    size = m.config.vision_config.image_size
    with torch.no_grad():
        tok = transformers.AutoTokenizer.from_pretrained(path)("a photo", return_tensors="pt")
        m(pixel_values=torch.randn(1, 3, size, size), input_ids=tok.input_ids, attention_mask=tok.attention_mask,
          use_image_text_matching_head=True)
forward = rss()
print(json.dumps({"baseline": base, "loaded": loaded, "forward": forward, "model_bytes": size,
                  "params": sum(p.numel() for p in m.parameters())}))
"""


def measure(which: str, path: Path, quantize: str = "none") -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, which, str(path), quantize], capture_output=True, text=True,
                         cwd=ROOT, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore",
                                        "OMP_NUM_THREADS": "2"})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a ~0.2B model for a quick check")
    parser.add_argument("--quantize", default="none", choices=["none", "int8"], help="ours quantized (CPU: int8)")
    args = parser.parse_args()
    path = make_checkpoint(ROOT / ".bench" / ("load-memory-small" if args.small else "load-memory-1b"), args.small)
    size = (path / "model.safetensors").stat().st_size
    gib = 1024**3
    print(f"checkpoint: {size / gib:.2f} GiB on disk")
    if args.quantize != "none":
        r = measure("ours", path, args.quantize)
        q = r["model_bytes"]
        print(f"ours {args.quantize}: {r['params'] / 1e9:.2f}B params, quantized model {q / gib:.2f} GiB "
              f"({q / size:.2f}x the fp32 file) | baseline {r['baseline'] / gib:.2f} GiB | peak after load "
              f"{r['loaded'] / gib:.2f} GiB = {r['loaded'] / q:.2f}x the quantized model "
              f"({(r['loaded'] - r['baseline']) / q:.2f}x over baseline) | after a forward pass "
              f"{r['forward'] / gib:.2f} GiB = {r['forward'] / q:.2f}x; load average {os.getloadavg()[0]:.1f}")
    for which in ("ours", "transformers"):
        r = measure(which, path)
        print(f"{which:>12}: {r['params'] / 1e9:.2f}B params | baseline {r['baseline'] / gib:.2f} GiB | "
              f"peak after load {r['loaded'] / gib:.2f} GiB = {r['loaded'] / size:.2f}x disk "
              f"(+{(r['loaded'] - r['baseline']) / size:.2f}x over baseline) | after a forward pass "
              f"{r['forward'] / gib:.2f} GiB = {r['forward'] / size:.2f}x disk")


if __name__ == "__main__":
    main()
