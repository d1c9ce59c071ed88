"""The paper's benchmarks, scored exactly as the paper scored them.

`caption` (pycocoevalcap scorers built explicitly), `vqa` (official VQAv2 rules, LAVIS mode, OK-VQA, GQA),
`retrieval` (LAVIS two-stage ITC -> ITM protocol and recall@k), `datasets` (official file readers). This module
holds what a model run shares: the settings a resumable `--out` run keeps and the files written there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip2cli.errors import InputError, UsageError
from blip2cli.files import atomic_write_text
from blip2cli.jsonl import check_settings, save_settings

if TYPE_CHECKING:
    from torch import Tensor

    from blip2cli.model.blip2 import Blip2
    from blip2cli.model.capabilities import Need

PixelsFn = Callable[[Sequence[Path]], "Tensor"]


def load_model(name: str, device: str, dtype: str, need: Need, job: str, quantize: str = "none",
               revision: str | None = None, cache_dir: Path | None = None) -> tuple[Blip2, PixelsFn]:
    """Load `--model` (a hub id at `revision`, downloaded into `cache_dir`) for a benchmark (refused at once if it
    cannot do `need`) and a pixel loader at its resolution; an unusable image stops the run, since a benchmark
    needs every image."""
    from blip2cli.data.images import load_image
    from blip2cli.data.prefetch import prefetch
    from blip2cli.data.transforms import eval_pixels
    from blip2cli.model import load
    from blip2cli.model.capabilities import require

    model = load.load_model(name, device, dtype, quantize=quantize, revision=revision, cache_dir=cache_dir)
    require(model, need, job, name)
    cfg = model.cfg

    def pixels(paths: Sequence[Path]) -> Tensor:
        try:  # eight threads: decoding JPEGs would otherwise starve the GPU
            images = list(prefetch(paths, load_image, threads=8, ahead=len(paths)))
        except InputError as exc:
            raise UsageError(f"{exc} (a benchmark needs every image)") from None
        return eval_pixels(images, cfg.vision.image_size, cfg.image_mean, cfg.image_std)

    return model, pixels


def check_inputs(predictions: Path | None, model: str | None, images: Path | None) -> None:
    """Score a file or run a model (one of them); a model run needs the image root."""
    if (predictions is None) == (model is None):
        raise UsageError("give --predictions FILE to score a file, or --model NAME to run a model (one of them)")
    if model is not None and images is None:
        raise UsageError("--images: required with --model (the folder holding the benchmark's images)")


def check_weights(out: Path | None, model: str | None, quantize: str) -> None:
    """Before a model loads: refuse at once a run in `out` started with another model or quantization."""
    if out is not None:
        check_settings(out / "run.json", {"model": model, "quantize": quantize}, str(out), partial=True)


def check_run(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume a run in `out` that was started with other settings (its predictions would be mixed in)."""
    check_settings(out / "run.json", settings, str(out))
    save_settings(out / "run.json", settings)


def resume_log(out: Path | None, settings: dict[str, Any], name: str = "predictions.jsonl") -> Path | None:
    """The log a model run appends to and resumes from (None without --out), once `check_run` accepts `out`."""
    if out is None:
        return None
    check_run(out, settings)
    return out / name


def write_outputs(out: Path, record: dict[str, Any], predictions: list[dict[str, Any]] | dict[str, Any] | None) -> None:
    """`scores.json` (the --json record) and `predictions.json` (official result format, rescorable)."""
    out.mkdir(parents=True, exist_ok=True)
    # issue 10: temp + rename, so a full disk leaves the previous files (never a 0-byte one) and says so in one line
    atomic_write_text(out / "scores.json", json.dumps(record, indent=2) + "\n")
    if predictions is not None:
        atomic_write_text(out / "predictions.json", json.dumps(predictions, ensure_ascii=False) + "\n")
