"""The training loop: setup (`run`) -> model, data, optimizer -> `fit`.

One code path for one CPU process, DDP on GPUs and gloo on CPUs: Accelerate reads the process layout from the
environment that `accelerate launch` or `torchrun` set, and nothing here spawns processes. The loader is never
passed to `prepare()` (ecosystem §6): each rank reads its own slice (train/data.py) and moves batches itself,
accumulation is counted by us (`sync_with_dataloader=False`), and the learning rate is set from the step
number before every optimizer step, so the schedule is in optimizer steps whatever the number of processes.

Precision (HF modeling_blip_2): the Q-Former, projections, ln_vision and query tokens keep fp32 master weights under
autocast (bf16 or fp16 with a GradScaler); the frozen ViT and LLM are stored in that half dtype, the ViT in fp32
when it is trained. Flan-T5 never runs in fp16; CPUs run fp32.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from blip2cli.config import Recipe, save_recipe
from blip2cli.errors import UsageError
from blip2cli.files import LineAppender, atomic_write_text
from blip2cli.model.blip2 import Blip2
from blip2cli.model.quantize import is_quantized_module
from blip2cli.train import checkpoint as ckpt
from blip2cli.train import sharding
from blip2cli.train.data import Batch, TrainData, ValBatches, build_train_data, build_val_batches
from blip2cli.train.feature_cache import CachedVision, FeatureCache
from blip2cli.train.health import StuckWatch
from blip2cli.train.optim import build_optimizer, lr_at, set_lr

LogFn = Callable[[dict[str, Any]], None]


class Objective(nn.Module):
    """A task's training loss as a module, so DDP sees a forward: batch -> {"loss", per-loss terms}."""

    def __init__(self, model: Blip2, recipe: Recipe, cache: FeatureCache | None = None) -> None:
        super().__init__()
        self.model = model
        self.stage1 = not recipe.uses_llm  # stage 1 and retrieval: ITC + ITM + ITG
        self.multi_positive = recipe.train.multi_positive
        self.prompt = recipe.model.llm.prompt
        self.cache = cache

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        images = self._images(batch)  # pixels (B, 3, S, S), or frozen ViT features (B, N, Dv) with the cache
        if self.stage1:
            out = self.model.stage1_loss(images, batch.texts, batch.image_ids if self.multi_positive else None)
            # Health metrics beside the losses (README: "what a healthy stage-1 run looks like").
            return {"loss": out.loss, "itc": out.itc, "itm": out.itm, "itg": out.itg, "itc_acc": out.itc_acc,
                    "itm_acc": out.itm_acc, "temp": self.model.temp.detach()}
        prompt = batch.prompts if batch.prompts is not None else self.prompt  # VQA: each sample's question
        return {"loss": self.model.stage2_loss(images, batch.texts, prompt, batch.outputs).loss}

    def _images(self, batch: Batch) -> Tensor:
        """With the feature cache: cached rows as they are, the others through the frozen ViT, then stored."""
        if self.cache is None:
            return batch.pixels
        cached = batch.cached if batch.cached is not None else torch.zeros(len(batch), dtype=torch.bool)
        if bool(cached.all()):
            return batch.features
        fresh = self.model.vision(batch.pixels)  # (M, N, Dv): the frozen tower, no gradient
        self.cache.put([k for k, hit in zip(batch.keys, cached.tolist()) if not hit], fresh)
        if batch.features is None:
            return fresh
        features = batch.features.to(fresh.dtype).clone()
        features[~cached.to(features.device)] = fresh
        return features


# ---------------------------------------------------------------------------------------------------------------
# Setup


def run(recipe: Recipe, out: Path, resume: str | None = None, stop_after: int | None = None,
        on_log: LogFn | None = None) -> tuple[int, bool]:
    """Train `recipe` into `out`; returns (last step, whether this is the main process). `resume`: None,
    "auto" or a step folder (one already at the last step returns at once). `stop_after` (`--max-steps`): stop
    after this optimizer step; the LR schedule still spans `train.max_steps`, so a resumed run continues it exactly."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import GradientAccumulationPlugin, set_seed

    t = recipe.train
    cuda = torch.cuda.is_available()
    layout = PartialState(cpu=not cuda)
    world, rank = layout.num_processes, layout.process_index
    accumulation, rest = divmod(t.global_batch_size, t.micro_batch_size * world)
    if rest or not accumulation:
        raise UsageError(f"train.global_batch_size: {t.global_batch_size} is not a multiple of micro_batch_size "
                         f"x processes = {t.micro_batch_size} x {world}")
    stop = t.max_steps if stop_after is None else stop_after
    if not 0 < stop <= t.max_steps:
        raise UsageError(f"--max-steps: expected 1..{t.max_steps} (train.max_steps; raise it with "
                         f"--set train.max_steps=N to lengthen the schedule), got {stop}")
    resume_dir = ckpt.find_resume(out, resume)
    previous = ckpt.TrainerState.read(resume_dir) if resume_dir else None
    if previous is not None and previous.step >= stop:  # a finished run: rerunning its command is not an error
        if layout.is_main_process:
            _note(f"{resume_dir} is at step {previous.step}: nothing left to do up to step {stop}")
        return previous.step, layout.is_main_process
    seq2seq = _is_seq2seq(recipe)
    mixed, frozen_dtype = _precision(recipe, cuda, seq2seq)

    # Data first: a wrong path or annotation file fails before any model loads.
    start = _data_position(previous, t.micro_batch_size, world)
    data = build_train_data(recipe, seq2seq, rank, world, start)
    val = build_val_batches(recipe, seq2seq, rank, world)

    acc = Accelerator(
        cpu=not cuda, mixed_precision=mixed, step_scheduler_with_optimizer=False,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=accumulation, sync_with_dataloader=False),
    )
    set_seed(t.seed)  # the same initial weights on every rank
    model = build_for_training(recipe, frozen_dtype, str(acc.device))
    if resume_dir is not None:
        ckpt.load_weights(resume_dir, model)
    cache = _feature_cache(recipe, model, data, acc.device) if t.feature_cache else None
    optimizer = build_optimizer(model, t, recipe.model.vision.depth)
    objective = Objective(model, recipe, cache)
    if t.fsdp:
        _shard(model, acc, with_vision=cache is None)
        sharding.ignore_in_ddp(objective)
    objective, optimizer = acc.prepare(objective, optimizer)

    state = ckpt.TrainerState(world_size=world, micro_batch_size=t.micro_batch_size, accumulation=accumulation,
                              max_steps=t.max_steps)
    if resume_dir is not None:
        saved = ckpt.load_training_state(resume_dir, optimizer, acc.scaler)
        state = replace(state, step=saved.step, micro_batches=start, samples=saved.samples)
    _prepare_out(acc, out, recipe, state.step, resume_dir)
    if acc.is_main_process:
        _describe(model, recipe, state, accumulation, world, resume_dir)
    set_seed(t.seed + rank)  # different dropout and negatives per rank
    if resume_dir is not None:
        ckpt.restore_rng(resume_dir, rank)
    fit(acc, objective, optimizer, data, val, recipe, out, state, stop, on_log)
    return state.step, acc.is_main_process


def _is_seq2seq(recipe: Recipe) -> bool:
    if not recipe.uses_llm:
        return False
    from transformers import AutoConfig

    try:
        from blip2cli.model.hub import pretrained
        from blip2cli.model.load import LLM_FIX

        return bool(pretrained(AutoConfig.from_pretrained, recipe.model.llm.name, LLM_FIX).is_encoder_decoder)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"model.llm.name: cannot read {recipe.model.llm.name}: {first}") from None


def _precision(recipe: Recipe, cuda: bool, seq2seq: bool) -> tuple[str, str]:
    """(Accelerate mixed_precision, dtype of the frozen towers)."""
    wanted = recipe.train.precision
    if not cuda:
        if wanted != "fp32":
            _note(f"train.precision {wanted} needs a GPU: this CPU run computes in fp32")
        return "no", "float32"
    bf16 = torch.cuda.is_bf16_supported()
    if wanted == "fp16" and seq2seq:  # transformers #23918
        _note("Flan-T5 overflows in fp16: training in " + ("bf16" if bf16 else "fp32"))
        wanted = "bf16" if bf16 else "fp32"
    if wanted == "bf16" and not bf16:
        _note("this GPU has no bf16: training in fp16")
        wanted = "fp16" if not seq2seq else "fp32"
    return {"bf16": ("bf16", "bfloat16"), "fp16": ("fp16", "float16"), "fp32": ("no", "float32")}[wanted]


def build_for_training(recipe: Recipe, frozen_dtype: str, device: str = "cpu") -> Blip2:
    """The model on the CPU: frozen parts from their sources in `frozen_dtype` (a trained ViT in fp32), the rest
    initialised, then `model.init`'s matching weights. With `train.quantize`, the frozen towers' linear layers
    are quantized on `device` as they load (bitsandbytes layers live on the GPU)."""
    from blip2cli.model.load import build_model

    cfg = recipe.model
    vit_trained = not cfg.vision.freeze
    quantize = recipe.train.quantize
    model = build_model(cfg, (device if quantize != "none" else "cpu", "float32" if vit_trained else frozen_dtype,
                              quantize))
    if vit_trained and model.llm is not None:
        model.llm.to(getattr(torch, frozen_dtype))
    if vit_trained and recipe.train.grad_checkpointing:
        tower = model.vision.tower
        if cfg.vision.kind == "eva":
            tower.grad_checkpointing = True
        else:
            tower.model.set_grad_checkpointing(True)
    if model.tokenizer is not None and len(model.tokenizer) > cfg.qformer.vocab_size:
        raise UsageError(f"model.qformer.vocab_size: {cfg.qformer.vocab_size} is smaller than the tokenizer's "
                         f"{len(model.tokenizer)} tokens ({cfg.qformer.tokenizer})")
    if cfg.qformer.init_std != 0.02:
        _reinit(model, cfg.qformer.init_std)
    if cfg.init:
        copied, skipped = ckpt.init_from(model, cfg.init)
        _note(f"model.init: {copied} weights from {cfg.init} ({skipped} not used)")
    model.train()
    return model


TRAINED_FROM_SCRATCH = ("query_tokens", "qformer.", "vision_proj.", "text_proj.", "itm_head.", "llm_proj.")


@torch.no_grad()
def _reinit(model: Blip2, std: float) -> None:
    """Redraw the random weight matrices, embeddings and query tokens of the trained parts at `std` (LayerNorms,
    biases and temp keep their init). BERT's 0.02 suits width 768; a width-64 Q-Former at 0.02 starts with
    query outputs that are 99.99% the same for every image and text features 99.99% the same for every caption,
    a saddle that ITC and ITM leave only after hundreds of steps (README, "a healthy stage-1 run")."""
    for name, p in model.named_parameters():
        if name.startswith(TRAINED_FROM_SCRATCH) and p.ndim >= 2:
            p.normal_(0.0, std)
    model.qformer.tie_weights()


def _feature_cache(recipe: Recipe, model: Blip2, data: TrainData, device: torch.device) -> FeatureCache:
    """Wrap the frozen tower so cached features pass through, and point the loader at the cache."""
    v = recipe.model.vision
    model.vision.to(device)  # half-precision towers may not run on the CPU
    with torch.no_grad():
        probe = model.vision(torch.zeros(1, 3, v.image_size, v.image_size, device=device))  # (1, N, Dv), its dtype
    source = f"{v.kind}:{v.weights or v.timm_name or f'random(seed={recipe.train.seed})'}:{v.image_size}px"
    if any(is_quantized_module(m) for m in model.vision.modules()):  # other features: another cache
        source += f":{recipe.train.quantize}"
    cache = FeatureCache(recipe.train.feature_cache, data.cache_keys(), tuple(probe.shape[1:]), probe.dtype, source)
    model.vision = CachedVision(model.vision)
    data.attach_cache(cache)
    return cache


def _shard(model: Blip2, acc, with_vision: bool) -> None:
    if acc.num_processes == 1:
        _note("train.fsdp: one process, nothing to shard")
        return
    count = sharding.shard_frozen(model, acc.device, with_vision)
    if acc.is_main_process:
        kept = "" if with_vision else " (the cached ViT stays whole)"
        _note(f"train.fsdp: {count / 1e6:.2f}M frozen parameters sharded over {acc.num_processes} processes{kept}")


def _data_position(previous: ckpt.TrainerState | None, micro: int, world: int) -> int:
    """Per-rank micro-batches already consumed; recomputed from samples when the process layout changed."""
    if previous is None:
        return 0
    if previous.world_size == world and previous.micro_batch_size == micro:
        return previous.micro_batches
    _note(f"resuming with {world} x {micro} instead of {previous.world_size} x {previous.micro_batch_size} samples "
          "per round: the data position is approximate")
    return previous.samples // (micro * world)


def _prepare_out(acc, out: Path, recipe: Recipe, step: int, resume_dir: Path | None) -> None:
    """out/recipe.yaml; on resume, metrics.jsonl loses the lines logged after the checkpoint (they are redone)."""
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        recipe_file = out / "recipe.yaml"
        if resume_dir is not None and recipe_file.is_file():
            before = recipe_file.read_text()
            save_recipe(recipe, recipe_file)
            if recipe_file.read_text() != before:
                _note(f"the recipe differs from the one {out} was started with (recipe.yaml now holds the new one)")
        else:
            save_recipe(recipe, recipe_file)
        metrics = out / "metrics.jsonl"
        if metrics.is_file():
            lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step] if resume_dir else []
            atomic_write_text(metrics, "".join(ln + "\n" for ln in kept))  # issue 10: never lost on a full disk
    acc.wait_for_everyone()


def _describe(model: Blip2, recipe: Recipe, state: ckpt.TrainerState, accumulation: int, world: int,
              resume_dir: Path | None) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    where = f"resuming at step {state.step} from {resume_dir}" if resume_dir else "starting at step 0"
    cpu = "" if torch.cuda.is_available() else f" ({torch.get_num_threads()} CPU threads each)"
    _note(f"{recipe.name}: training {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters; {world} process(es)"
          f"{cpu} x {recipe.train.micro_batch_size} samples x {accumulation} accumulation = "
          f"{recipe.train.global_batch_size} per step; {where}")


def _note(message: str) -> None:
    from blip2cli.render import note

    note(message)  # issue 10: paths are not read as markup


# ---------------------------------------------------------------------------------------------------------------
# The loop


def fit(acc, objective: nn.Module, optimizer, data: TrainData, val: ValBatches | None, recipe: Recipe, out: Path,
        state: ckpt.TrainerState, stop: int, on_log: LogFn | None = None) -> ckpt.TrainerState:
    """Optimizer steps from state.step to `stop`: log, evaluate and save on their schedules."""
    t = recipe.train
    model: Blip2 = acc.unwrap_model(objective).model
    steps_per_epoch = data.batches_per_epoch / state.accumulation
    trainable = [p for p in model.parameters() if p.requires_grad]
    log = _Logger(acc, out, on_log)
    watch = StuckWatch(t.stuck_warning_steps, t.micro_batch_size * acc.num_processes, state.step)
    window: dict[str, list[Tensor]] = defaultdict(list)
    clock, seen, shown = time.perf_counter(), 0, ""
    objective.train()
    set_lr(optimizer, lr_at(state.step, t, steps_per_epoch))
    with _progress(acc, state.step, stop) as bar:
        for batch in data.batches():
            batch = batch.to(acc.device)
            with acc.accumulate(objective):
                terms = objective(batch)
                acc.backward(terms["loss"])  # divided by the accumulation steps inside
                if acc.sync_gradients and t.max_grad_norm:
                    acc.clip_grad_norm_(trainable, t.max_grad_norm)
                optimizer.step()  # a no-op until the last micro-batch of the step
                optimizer.zero_grad(set_to_none=True)
            for name, value in terms.items():
                window[name].append(value.detach().float())
            state.micro_batches += 1
            state.samples += len(batch) * acc.num_processes
            seen += len(batch) * acc.num_processes
            if not acc.sync_gradients:
                continue
            state.step += 1
            lr = lr_at(state.step - 1, t, steps_per_epoch)  # the rate this step used
            set_lr(optimizer, lr_at(state.step, t, steps_per_epoch))
            if state.step % t.log_every == 0 or state.step == stop:
                record = {"step": state.step, **_mean(acc, window), "lr": float(f"{lr:.6g}"),
                          "epoch": round(state.micro_batches / data.batches_per_epoch, 4),
                          "samples_per_s": round(seen / (time.perf_counter() - clock), 2)}
                log(record)
                warning = watch(record)
                if warning and acc.is_main_process:
                    _note(warning)
                shown = _progress_info(record, lr)
                window.clear()
                clock, seen = time.perf_counter(), 0
            bar(state.step, shown)
            if val is not None and t.eval_every and state.step % t.eval_every == 0:
                log({"step": state.step, **evaluate(acc, objective, val)})
            if state.step % t.save_every == 0 or state.step == stop:
                save(acc, out, model, recipe, state, optimizer)
            if state.step >= stop:
                break
    log.close()
    return state


def _progress_info(record: dict[str, Any], lr: float) -> str:
    """The progress line: the losses, stage 1's health metrics where present, speed and learning rate."""
    parts = [f"loss {record['loss']:.4f}"]
    parts += [f"{k} {record[k]:.3f}" for k in ("itc", "itm", "itg", "itc_acc", "itm_acc") if k in record]
    if "temp" in record:
        parts.append(f"temp {record['temp']:.4f}")
    return "  ".join(parts + [f"{record['samples_per_s']:.1f} samples/s", f"lr {lr:.2e}"])


def _mean(acc, window: dict[str, list[Tensor]]) -> dict[str, float]:
    """Mean of each loss term over the window's micro-batches and over all ranks."""
    names = list(window)
    local = torch.stack([torch.stack(window[n]).mean() for n in names])
    reduced = acc.reduce(local.to(acc.device), reduction="mean")
    return {n: round(float(v), 6) for n, v in zip(names, reduced.tolist())}


@torch.no_grad()
def evaluate(acc, objective: nn.Module, val: ValBatches) -> dict[str, float]:
    """Mean loss terms on the held-out batches, dropout off; the training random state is left untouched."""
    objective.eval()
    window: dict[str, list[Tensor]] = defaultdict(list)
    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for batch in val:
            for name, value in objective(batch.to(acc.device)).items():
                if name != "temp":  # a weight, not a measurement of the held-out data
                    window[name].append(value.float())
    objective.train()
    return {f"val_{name}": value for name, value in _mean(acc, window).items()}


def save(acc, out: Path, model: Blip2, recipe: Recipe, state: ckpt.TrainerState, optimizer) -> None:
    folder = ckpt.step_dir(out, state.step)
    ckpt.save_checkpoint(acc, folder, model, recipe, state, optimizer, acc.scaler)
    if acc.is_main_process:
        _note(f"saved {folder}")
        if state.step == recipe.train.max_steps:
            _note(f"saved {ckpt.write_final(out, folder)}")
        ckpt.prune(out, recipe.train.keep_last)
    acc.wait_for_everyone()


class _Logger:
    """metrics.jsonl, TensorBoard (when installed) and the caller's callback; main process only."""

    def __init__(self, acc, out: Path, on_log: LogFn | None) -> None:
        self.main, self.on_log = acc.is_main_process, on_log
        self.file = LineAppender(out / "metrics.jsonl") if self.main else None  # issue 10: whole lines only
        self.tb = None
        if self.main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:
                pass

    def __call__(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if self.on_log is not None:
            self.on_log(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


@contextmanager
def _progress(acc, first: int, stop: int) -> Iterator[Callable[[int, str], None]]:
    """A progress bar on stderr (main process) with the time spent and left, the last logged loss and samples/s;
    yields its update. At the end, one line: "trained 60 steps in 40.1 s (1.5 steps/s)"."""
    if not acc.is_main_process:
        yield lambda step, info: None
        return
    from rich.progress import Progress, TextColumn
    from rich.table import Column

    from blip2cli.render import bar_columns, console, note, rate_line

    # the losses take what room is left on the line (cut short with "…" on a narrow one), the counts keep theirs
    info = TextColumn("{task.fields[info]}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"))
    started, last = time.perf_counter(), [first]
    with Progress(*bar_columns("[bold]train", "steps", bar_width=20), info, console=console, expand=True) as bar:
        task = bar.add_task("train", total=stop, completed=first, info="")

        def update(step: int, info: str) -> None:
            last[0] = step
            bar.update(task, completed=step, info=info)

        yield update
    if last[0] > first:
        note(rate_line("trained", last[0] - first, "steps", time.perf_counter() - started))
