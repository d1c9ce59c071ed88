"""Caption metrics exactly as pycocoevalcap computes them, with its scorers built one by one.

`COCOEvalCap.evaluate()` constructs SPICE first, which downloads Stanford CoreNLP and so aborts offline with
nothing computed (ecosystem §3). Here: PTB-tokenize (Java, CoreNLP 3.4.1 bundled with pycocoevalcap) -> BLEU-1..4,
METEOR, ROUGE-L, CIDEr(-D) -> SPICE only when its CoreNLP 3.6.0 jars are in place. Scores are fractions
(CIDEr 1.458 = 145.8 in the paper). pycocoevalcap writes its temp files into the installed package; we run the
same jars with temp files in the system temp folder, so a read-only install works too.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from blip2cli.decoding import CAPTION_PROMPT, Decoding, caption_defaults
from blip2cli.errors import UsageError
from blip2cli.eval import check_inputs, check_weights, load_model, resume_log, write_outputs
from blip2cli.eval import datasets as ds
from blip2cli.jsonl import run_resumable

if TYPE_CHECKING:
    from blip2cli.config import GenerationOptions
    from blip2cli.model.blip2 import Blip2

K = TypeVar("K")

METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")  # families; Bleu gives Bleu_1..Bleu_4
FAST_METRICS = ("Bleu", "ROUGE_L", "CIDEr")  # no JVM beyond the tokenizer
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
# pycocoevalcap's PTBTokenizer drops these tokens (its list is case-sensitive, so lower-cased "-lrb-" stays)
PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}  # fmt: skip


@dataclass
class CaptionScores:
    n: int
    metrics: dict[str, float]  # pycocoevalcap names and scale
    domains: dict[str, dict[str, float]] = field(default_factory=dict)  # NoCaps: {"in-domain": {"CIDEr", "SPICE"}}
    warnings: list[str] = field(default_factory=list)
    official: bool = True  # False when the fallback tokenizer stood in for Java's


def score_captions(
    refs: Mapping[K, Sequence[str]],
    preds: Mapping[K, str],
    metrics: Collection[str] = METRICS,
    domains: Mapping[K, str] | None = None,
) -> CaptionScores:
    """Score one predicted caption per image against its references; with `domains`, also per domain."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise UsageError(f"--metrics: unknown {', '.join(sorted(unknown))} (choose from {', '.join(METRICS)})")
    if set(refs) != set(preds):
        raise ValueError("refs and preds must cover the same images")  # the readers check this for users
    ids = list(refs)
    out = CaptionScores(n=len(ids), metrics={})
    java = java_problem()
    if java:
        out.official = False
        out.warnings.append(f"{java}; METEOR and SPICE dropped, and a regex tokenizer stands in for Java's PTB "
                            "tokenizer: these scores are NOT official")  # fmt: skip
    if "CIDEr" in metrics and len(ids) < 2:
        out.warnings.append("CIDEr takes its IDF from the evaluated references: with one image it is always 0")
    tokenized = (fallback_tokenize if java else ptb_tokenize)(
        {**{("ref", k): list(refs[k]) for k in ids}, **{("pred", k): [preds[k]] for k in ids}}
    )
    gts = {k: tokenized[("ref", k)] for k in ids}
    res = {k: tokenized[("pred", k)] for k in ids}

    spice_scores: dict[K, float] = {}
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for --json; scorers may print
        for name in [m for m in METRICS if m in metrics]:
            if name in ("METEOR", "SPICE") and java:
                continue
            if name == "SPICE":
                problem = spice_problem()
                if problem:
                    out.warnings.append(problem)
                    continue
                spice_scores = run_spice(gts, res)
                out.metrics["SPICE"] = _mean(spice_scores.values())
            else:
                out.metrics.update(_score_one(name, gts, res))
    if domains:
        out.domains = _per_domain(gts, res, domains, spice_scores, metrics)
    return out


def _score_one(name: str, gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if name == "Bleu":
        scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
        return {f"Bleu_{i + 1}": float(s) for i, s in enumerate(scores)}
    if name == "METEOR":
        return {"METEOR": run_meteor(gts, res)}
    scorer = Rouge() if name == "ROUGE_L" else Cider()
    score, _ = scorer.compute_score(gts, res)
    return {name: float(score)}


def run_meteor(gts: dict[Any, list[str]], res: dict[Any, list[str]]) -> float:
    """METEOR 1.5 (JVM with a 2 GB heap; ~30 s to start)."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    try:
        score, _ = meteor.compute_score(gts, res)
    except ValueError:  # the JVM died and answered with an empty line
        raise UsageError("METEOR's Java process failed (it needs about 2 GB of memory); "
                         "rerun with --metrics Bleu,ROUGE_L,CIDEr to skip it") from None  # fmt: skip
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    return float(score)


def _per_domain(
    gts: dict[K, list[str]], res: dict[K, list[str]], domains: Mapping[K, str],
    spice: Mapping[K, float], metrics: Collection[str],
) -> dict[str, dict[str, float]]:  # fmt: skip
    """NoCaps reports CIDEr and SPICE per domain, each scored on that domain's images alone (CIDEr's IDF too)."""
    from pycocoevalcap.cider.cider import Cider

    out: dict[str, dict[str, float]] = {}
    for domain in sorted(set(domains.values())):
        ids = [k for k in gts if domains.get(k) == domain]
        scores: dict[str, float] = {}
        if "CIDEr" in metrics:
            scores["CIDEr"] = float(Cider().compute_score({k: gts[k] for k in ids}, {k: res[k] for k in ids})[0])
        if spice:
            scores["SPICE"] = _mean(spice[k] for k in ids)
        out[domain] = scores
    return out


def _mean(values: Any) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Java: PTB tokenizer and SPICE


def _package_dir(sub: str) -> Path:
    import pycocoevalcap

    return Path(next(iter(pycocoevalcap.__path__))) / sub


def java_problem() -> str | None:
    """Why Java cannot run, or None."""
    if shutil.which("java") is None:
        return "Java was not found on PATH (install a JRE, e.g. `apt-get install default-jre-headless`)"
    return None


def ptb_tokenize(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """pycocoevalcap's PTBTokenizer: CoreNLP 3.4.1, one caption per line, lower-cased, punctuation tokens dropped."""
    keys = [k for k, caps in captions.items() for _ in caps]
    lines = [re.sub(r"[\r\n]", " ", c) for caps in captions.values() for c in caps]
    jar = _package_dir("tokenizer") / "stanford-corenlp-3.4.1.jar"
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as fh:
        fh.write("\n".join(lines))
    try:
        cmd = [
            "java",
            "-cp",
            str(jar),
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            fh.name,
        ]
        proc = subprocess.run(cmd, capture_output=True, check=False)
    finally:
        Path(fh.name).unlink(missing_ok=True)
    out_lines = proc.stdout.decode("utf-8").split("\n")
    if proc.returncode != 0 or len(out_lines) < len(lines):
        raise UsageError(f"the Java PTB tokenizer failed: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    tokenized: dict[K, list[str]] = {k: [] for k in captions}
    for key, line in zip(keys, out_lines):
        tokenized[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION))
    return tokenized


def fallback_tokenize(captions: Mapping[K, Sequence[str]]) -> dict[K, list[str]]:
    """A regex stand-in for the PTB tokenizer when Java is missing: close on plain captions, not identical."""
    pattern = re.compile(r"n't|'\w+|\w+(?:[.,]\w+)*|[^\w\s]")
    return {
        k: [" ".join(t for t in pattern.findall(c.lower()) if t not in PTB_PUNCTUATION) for c in caps]
        for k, caps in captions.items()
    }


def spice_problem() -> str | None:
    """Why SPICE cannot run offline, or None. SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads."""
    lib = _package_dir("spice") / "lib"
    missing = [jar for jar in CORENLP_JARS if not (lib / jar).is_file()]
    if missing:
        return (f"SPICE skipped: put {' and '.join(missing)} (from stanford-corenlp-full-2015-12-09.zip) "
                f"into {lib}")  # fmt: skip
    return None


def run_spice(gts: dict[K, list[str]], res: dict[K, list[str]]) -> dict[K, float]:
    """Per-image SPICE F-scores. Run without SPICE's LMDB cache, which fails on Java >= 9."""
    spice_dir = _package_dir("spice")
    keys = list(gts)
    records = [{"image_id": i, "test": res[k][0], "refs": gts[k]} for i, k in enumerate(keys)]
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(records))
        cmd = ["java", "-jar", "-Xmx8G", "spice-1.0.jar", str(src), "-out", str(dst), "-subset", "-silent"]
        proc = subprocess.run(cmd, cwd=spice_dir, capture_output=True, check=False)
        if proc.returncode != 0 or not dst.is_file():
            raise UsageError(f"SPICE failed (it needs about 8 GB of memory): "
                             f"{proc.stderr.decode(errors='replace').strip()[-300:]}")  # fmt: skip
        results = json.loads(dst.read_text())
    return {keys[r["image_id"]]: _float(r["scores"]["All"]["f"]) for r in results}


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Running a model


def generate_captions(
    model: Blip2,
    images: Mapping[int, Path],
    pixels_fn: Callable[[Sequence[Path]], Any],
    prompt: str,
    options: GenerationOptions,
    batch_size: int,
    log: Path | None = None,
) -> dict[int, str]:
    """One caption per image with `model.generate` (blip2cli.config.GenerationOptions); resumable through `log`."""
    import torch

    def predict(batch: list[tuple[int, Path]]) -> list[dict[str, Any]]:
        pixels = pixels_fn([path for _, path in batch]).to(model.device)
        with torch.inference_mode():
            texts = model.generate(pixels, [prompt] * len(batch), options)
        return [{"image_id": image_id, "caption": caps[0].strip()} for (image_id, _), caps in zip(batch, texts)]

    done = run_resumable(list(images.items()), lambda item: item[0], "image_id", predict, batch_size, log, "captioning",
                         unit="images", done_verb="captioned")
    return {image_id: done[image_id]["caption"] for image_id in images}


def eval_caption(
    *,
    annotations: Path,
    predictions: Path | None = None,
    model: str | None = None,
    images: Path | None = None,
    dataset: Literal["coco", "nocaps"] = "coco",
    metrics: Sequence[str] = METRICS,
    prompt: str = CAPTION_PROMPT,
    decoding: Decoding = Decoding(),
    device: str = "auto",
    dtype: str = "auto",
    quantize: str = "none",
    batch_size: int = 16,
    out: Path | None = None,
    revision: str | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Score `predictions`, or caption the benchmark's `images` with `model` (the paper's decoding with
    `decoding` on top; resumable in `out`; a hub id at `revision`, downloaded into `cache_dir`); writes
    `out`/scores.json and predictions.json; returns the record."""
    check_inputs(predictions, model, images)
    data = ds.read_caption_annotations(annotations)
    warnings = []
    if dataset == "nocaps" and not data.domains:
        warnings.append(f"{annotations}: images carry no `domain`, so there is no in/near/out-domain breakdown")
    if predictions is not None:
        preds = ds.read_caption_predictions(predictions)
        ds.check_same_ids(set(preds), set(data.refs), predictions, annotations, "image")
    else:
        paths = ds.resolve_images(images, [data.files[i] for i in data.refs])
        check_weights(out, model, quantize)  # before the (long) load
        net, pixels = load_model(model, device, dtype, "caption", "eval caption", quantize, revision, cache_dir)
        options = decoding.apply(caption_defaults(net, prompt))
        log = resume_log(out, {"task": "caption", "model": model, "revision": revision, "quantize": quantize,
                               "annotations": str(annotations), "prompt": prompt, "options": vars(options)})
        preds = generate_captions(net, dict(zip(data.refs, paths)), pixels, prompt, options, batch_size, log)
    scores = score_captions(data.refs, preds, metrics, data.domains or None)
    record: dict[str, Any] = {"task": "caption", "n": scores.n, "metrics": scores.metrics}
    if scores.domains:
        record["domains"] = scores.domains
    if warnings + scores.warnings:
        record["warnings"] = warnings + scores.warnings
    if out is not None:
        rows = [{"image_id": i, "caption": preds[i]} for i in data.refs] if predictions is None else None
        write_outputs(out, record, rows)
    return record
