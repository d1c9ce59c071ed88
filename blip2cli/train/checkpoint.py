"""Step folders, resuming, and initial weights.

    out/recipe.yaml  metrics.jsonl  tb/
    out/step-00005000/  recipe.yaml  model.safetensors  qformer_tokenizer/  llm_tokenizer/        (a run dir:
                        optimizer.pt  scaler.pt  rng_state_{rank}.pt  trainer_state.json          load_model reads it)
    out/final/          the last step's weights, recipe, tokenizers and trainer_state.json (hard links)

`model.safetensors` holds what cannot be rebuilt from a named source: the trainable weights (our names), plus
the frozen ViT when it has no weights file (a random or timm tower). Folders are written under a temporary
name and renamed when complete, so `--resume auto` never picks a half-written one. Step numbers are optimizer
steps and folder names are explicit: no Accelerate automatic naming, whose counter restarts on resume
(accelerate #1601, #3306).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from blip2cli.config import ModelConfig, Recipe, save_recipe
from blip2cli.errors import Interrupted, UsageError
from blip2cli.files import disk_full, is_disk_full
from blip2cli.model.blip2 import Blip2
from blip2cli.model.load import LLM_TOKENIZER_DIR, QFORMER_TOKENIZER_DIR, RUN_RECIPE, RUN_WEIGHTS
from blip2cli.train.sharding import full

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCALER_FILE = "scaler.pt"
FINAL = "final"
_STEP = re.compile(r"step-(\d{8})$")


@dataclass
class TrainerState:
    """Counters that place a run exactly: saved in trainer_state.json."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # micro-batches each rank has consumed: the data position
    samples: int = 0  # samples consumed over all ranks
    world_size: int = 1
    micro_batch_size: int = 1
    accumulation: int = 1
    max_steps: int = 0  # the schedule's length (train.max_steps)

    @classmethod
    def read(cls, folder: Path) -> TrainerState:
        raw = json.loads((folder / STATE_FILE).read_text())
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})

    def write(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")


def step_dir(out: Path, step: int) -> Path:
    return out / f"step-{step:08d}"


def step_dirs(out: Path) -> list[Path]:
    """Complete step folders, oldest first (a folder gets its name only once complete: `.step-N.tmp/` before)."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and _STEP.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def remove_partial(out: Path) -> None:
    """Delete `.step-N.tmp/` folders: saves cut short (a kill, a full disk); they are never resumed from."""
    if out.is_dir():
        for tmp in out.glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)


def find_resume(out: Path, resume: str | None) -> Path | None:
    """`--resume auto`: the newest step folder in `out`, or None to start fresh. `--resume PATH`: that folder.
    Without --resume, an `out` that already holds checkpoints is an error (nothing is overwritten)."""
    remove_partial(out)
    existing = step_dirs(out)
    if resume is None:
        if existing:
            raise UsageError(f"{out} already holds checkpoints (newest: {existing[-1].name}): pass --resume auto to "
                             "continue, or choose another --out")
        return None
    if resume == "auto":
        return existing[-1] if existing else None
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file() or not (folder / RUN_WEIGHTS).is_file():
        raise UsageError(f"--resume {resume}: not a step folder (expected {STATE_FILE} and {RUN_WEIGHTS} in it)")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Weights


def saved_weights(model: Blip2, cfg: ModelConfig) -> dict[str, Tensor]:
    """Trainable weights, plus the frozen ViT when no named source can rebuild it. A ViT sharded by `train.fsdp`
    is gathered whole, so with several processes every one of them must call this."""
    state = model.trainable_state_dict()
    rebuildable = cfg.vision.kind == "eva" and bool(cfg.vision.weights)
    if not rebuildable:
        for name, p in model.named_parameters():
            if name.startswith("vision.") and name not in state:
                state[name] = full(p)
    return {_unwrap_name(k): v for k, v in state.items()}


def _unwrap_name(name: str) -> str:
    """The feature cache wraps the tower (vision.inner.tower...): checkpoints keep the model's own names."""
    return name.replace("vision.inner.", "vision.")


def load_weights(folder: Path, model: Blip2) -> None:
    """Copy a step folder's weights into the (unwrapped) model, in place, each in its parameter's dtype."""
    from blip2cli.model.weights import read_safetensors

    params = {_unwrap_name(k): p for k, p in model.named_parameters()}
    saved = read_safetensors(folder / RUN_WEIGHTS)
    missing = [k for k in saved if k not in params]
    if missing:
        raise UsageError(f"{folder}: weights {missing[:3]} do not fit this model (was the recipe's model changed?)")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)


def init_from(model: Blip2, source: str) -> tuple[int, int]:
    """`model.init`: copy every weight of `source` (anything --model accepts) whose name and shape match, except
    the frozen LLM, which always comes from model.llm.name. Returns (copied, left out)."""
    from blip2cli.model.vision import interpolate_pos_embed

    params = dict(model.named_parameters())
    copied = skipped = 0
    with torch.no_grad():
        for name, tensor in _checkpoint_tensors(source):
            if name is None or name.startswith("llm.model."):
                skipped += 1
                continue
            target = params.get(name)
            if target is None:
                target = params.get(name.replace("vision.", "vision.inner.", 1))
            if target is None:
                skipped += 1
                continue
            if name.endswith("vision.tower.pos_embed") and tensor.shape != target.shape:
                tensor = interpolate_pos_embed(tensor, target.shape[1])  # 224 -> 364 / 490 px (LAVIS eva_vit)
            if tuple(tensor.shape) != tuple(target.shape):
                raise UsageError(f"model.init: {name} has shape {tuple(tensor.shape)} in {source}, the model "
                                 f"expects {tuple(target.shape)}")
            target.copy_(tensor)
            copied += 1
    if not copied:
        raise UsageError(f"model.init: no weight of {source} fits this model")
    return copied, skipped


def _checkpoint_tensors(source: str) -> Iterable[tuple[str | None, Tensor]]:
    """(our name, tensor) from a run dir, a LAVIS .pth or a Hugging Face BLIP-2 folder / hub id, read lazily."""
    from blip2cli.model import load
    from blip2cli.model.weights import checkpoint_files, iter_tensors, read_safetensors, safe_torch_load

    path = Path(source).expanduser()
    if path.is_dir() and not (path / RUN_WEIGHTS).is_file() and (path / FINAL / RUN_WEIGHTS).is_file():
        path = path / FINAL
    if path.is_dir() and (path / RUN_WEIGHTS).is_file():
        yield from read_safetensors(path / RUN_WEIGHTS).items()
        return
    if path.is_file():
        raw = safe_torch_load(path)
        state = raw.get("model", raw) if isinstance(raw, dict) else {}
        for name, tensor in state.items():
            yield load.lavis_to_ours(name), tensor
        return
    directory = path if path.is_dir() else load.download(source, fix="--set model.init=DIR (a local checkpoint)")
    for name, tensor in iter_tensors(checkpoint_files(directory)):
        ours = load.hf_to_ours(name)
        if ours is not None and ours.endswith(".attn.qkv.bias"):
            yield from load.split_qkv_biases({ours: tensor}).items()
        else:
            yield ours, tensor


# ---------------------------------------------------------------------------------------------------------------
# Saving and restoring


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(folder: Path, rank: int) -> None:
    path = folder / f"rng_state_{rank}.pt"
    if not path.is_file():
        warnings.warn(f"{path.name} not in {folder} (a different number of processes?): random state not restored",
                      stacklevel=2)
        return
    state = torch.load(path, weights_only=False)  # our own file: python and numpy states are tuples
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(acc, folder: Path, model: Blip2, recipe: Recipe, state: TrainerState,
                    optimizer: torch.optim.Optimizer, scaler) -> None:
    """Write a complete step folder (every rank calls this: each saves its random state). It is written as
    `.step-N.tmp/` and renamed when complete; a save that fails (a full disk) removes it and raises DiskFull."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    try:
        _save_into(acc, tmp, folder, model, recipe, state, optimizer, scaler)
    except BaseException as exc:
        full = is_disk_full(exc, folder.parent)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial save took
        if full:
            raise disk_full(folder, _checkpoint_bytes(folder.parent, model)) from None
        raise


def _save_into(acc, tmp: Path, folder: Path, model: Blip2, recipe: Recipe, state: TrainerState,
               optimizer: torch.optim.Optimizer, scaler) -> None:  # fmt: skip
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
    weights = saved_weights(model, recipe.model)  # on every rank: sharded weights are gathered collectively
    if acc.is_main_process:
        write_run_dir(tmp, model, recipe, weights)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / SCALER_FILE)
        state.write(tmp)
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    acc.wait_for_everyone()


def _checkpoint_bytes(out: Path, model: Blip2) -> int:
    """What one step folder takes: the newest complete one's size, else the trainable weights with Adam's two
    moments (x3)."""
    done = step_dirs(out)
    if done:
        return sum(p.stat().st_size for p in done[-1].rglob("*") if p.is_file())
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def interrupted(out: Path, step: int | None = None) -> Interrupted:
    """The line for Ctrl-C during training: which checkpoint is saved and how to go on from it."""
    done = step_dirs(out)
    at = f" at step {step}" if step is not None else ""
    if not done:
        return Interrupted(f"interrupted{at}: no checkpoint saved yet in {out} (one is saved every "
                           "train.save_every steps); rerun the same command to start again")  # fmt: skip
    saved = TrainerState.read(done[-1]).step
    return Interrupted(f"interrupted{at}: the last checkpoint is {done[-1]} (step {saved}); rerun with "
                       f"--resume auto --out {out} to go on from it")  # fmt: skip


@contextmanager
def reported_faults(out: Path) -> Iterator[None]:
    """Around a training run: Ctrl-C says what was saved and how to go on (exit 130); a full disk outside a
    checkpoint save (metrics.jsonl, TensorBoard) is one line (exit 1). Partial step folders are removed."""
    try:
        yield
    except KeyboardInterrupt:
        remove_partial(out)
        raise interrupted(out) from None
    except Exception as exc:
        if isinstance(exc, UsageError) or not is_disk_full(exc, out):
            raise
        remove_partial(out)
        raise disk_full(out) from None


def write_run_dir(folder: Path, model: Blip2, recipe: Recipe, weights: dict[str, Tensor]) -> None:
    """What `load_model` needs: recipe.yaml, model.safetensors (`weights`, from `saved_weights`) and the
    tokenizers."""
    from blip2cli.model.weights import save_safetensors

    save_recipe(recipe, folder / RUN_RECIPE)
    save_safetensors(weights, folder / RUN_WEIGHTS, {"format": "pt"})
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder / QFORMER_TOKENIZER_DIR)
    if model.llm is not None:
        model.llm.tokenizer.save_pretrained(folder / LLM_TOKENIZER_DIR)


def load_training_state(folder: Path, optimizer: torch.optim.Optimizer, scaler) -> TrainerState:
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    if scaler is not None and (folder / SCALER_FILE).is_file():
        scaler.load_state_dict(torch.load(folder / SCALER_FILE, weights_only=True))
    return TrainerState.read(folder)


def write_final(out: Path, folder: Path) -> Path:
    """out/final: the last step's run dir (hard links where the filesystem allows), without optimizer or RNG."""
    final = out / FINAL
    shutil.rmtree(final, ignore_errors=True)

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    try:
        shutil.copytree(folder, final, copy_function=link,
                        ignore=shutil.ignore_patterns(OPTIMIZER_FILE, SCALER_FILE, "rng_state_*"))
    except BaseException as exc:  # copies where links are refused can fill the disk: no half `final/`
        shutil.rmtree(final, ignore_errors=True)
        if is_disk_full(exc, out):
            raise disk_full(final, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())) from None
        raise
    return final


def prune(out: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step folders (0 keeps everything)."""
    if keep_last <= 0:
        return
    for folder in step_dirs(out)[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)
