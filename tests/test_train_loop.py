"""train.loop end to end on tiny models: losses fall, a resumed run equals an uninterrupted one, two CPU
processes train together (DDP and FSDP, marked slow), checkpoints load for captioning, every task fine-tunes, and
recipe mistakes are one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip2cli.cli import app

from tests.training import RECIPE, losses_of, run_cli, runner, sets_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stage1(assets, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("stage1") / "run"
    lines = run_cli(["pretrain", "--stage", "1", str(RECIPE), "--out", str(out), "--json",
                    *sets_for(assets, 24, **{"train.lr": 2e-3, "train.save_every": 12})])
    return out, lines


def test_stage1_losses_fall_and_outputs_are_complete(stage1):
    out, lines = stage1
    losses = losses_of(lines)
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
    lines = run_cli(["pretrain", "--stage", "2", str(RECIPE), "--out", str(tmp_path / "s2"), "--json",
                    *sets_for(assets, 24, **{"stage": 2, "model.llm.name": assets["opt"], "model.qformer.text": "false",
                                          "model.init": stage1[0] / "final", "model.llm.prompt": "a photo of",
                                          "train.lr": 2e-3})])
    losses = losses_of(lines)
    assert len(losses) == 24 and set(lines[0]) >= {"step", "loss", "lr"} and "itc" not in lines[0]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert (tmp_path / "s2" / "final" / "llm_tokenizer").is_dir()


def test_resumed_run_matches_uninterrupted_run(assets, tmp_path):
    """Kill-and-resume (stop at 6, resume to 12) gives the same per-step losses as 12 steps in one go; the eval
    hook runs in between without disturbing the random state."""
    sets = sets_for(assets, 12, **{"train.save_every": 3, "train.eval_every": 4, "train.keep_last": 2})
    run_cli(["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "a"), "--json", *sets])
    first = run_cli(["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "b"), "--json", *sets,
                    "--max-steps", "6"])
    assert first[-1] == {"out": str(tmp_path / "b"), "step": 6} and not (tmp_path / "b" / "final").exists()
    again = runner.invoke(app, ["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "b"), *sets])
    assert again.exit_code == 2 and "--resume auto" in again.stderr  # never overwrites a run by accident
    run_cli(["pretrain", "--stage", "1", str(RECIPE), "--out", str(tmp_path / "b"), "--json", *sets,
            "--resume", "auto"])
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "itc", "itm", "itg", "val_loss", "lr"):
            if key in ra:
                assert abs(ra[key] - rb[key]) <= 1e-6, (ra, rb)
    assert len(losses_of(a, "val_loss")) == 3
    assert sorted(p.name for p in (tmp_path / "b").glob("step-*")) == ["step-00000009", "step-00000012"]


@pytest.mark.slow
def test_two_cpu_processes_train_together(assets, tmp_path):
    """`accelerate launch` with two gloo processes (accelerate 1.15 starts several CPU processes only through its
    multi-process launcher; `--cpu --num_processes 2` alone starts one). One checkpoint, written once."""
    out = tmp_path / "ddp"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29533", "-m", "blip2cli", "pretrain", "--stage", "1", str(RECIPE), "--out", str(out), "--json",
               *sets_for(assets, 4, **{"train.global_batch_size": 8, "train.micro_batch_size": 2})]
    done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(x) for x in done.stdout.splitlines() if x.startswith("{")]
    assert lines[-1] == {"out": str(out), "step": 4} and len(losses_of(lines)) == 4  # only rank 0 prints
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
@pytest.mark.slow
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
    sets = sets_for(assets, 3, **{"stage": 2, "model.llm.name": name, "model.qformer.text": "false",
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
    losses = {k: losses_of([json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]) for k, r in runs.items()}
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
                                 "99", *sets_for(assets, 10)])
    assert result.exit_code == 2 and "--max-steps: expected 1..10" in result.stderr


def test_retrieval_finetune_trains_the_vit_with_layer_decay(assets, stage1, tmp_path):
    sets = sets_for(assets, 3, **{"task": "retrieval", "stage": 0, "model.vision.freeze": "false",
                               "model.init": stage1[0] / "final", "train.multi_positive": "true",
                               "train.grad_checkpointing": "true", "train.lr_layer_decay": 0.9})
    lines = run_cli(["finetune", str(RECIPE), "--out", str(tmp_path / "ft"), "--json", *sets])
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
    sets = sets_for(assets, 3, **{"task": "caption", "stage": 0, "model.llm.name": t5, "model.qformer.text": "false",
                               "model.llm.prompt": "a photo of", "model.llm.eos_text": ""})
    lines = run_cli(["finetune", str(RECIPE), "--out", str(tmp_path / "cap"), "--json", *sets])
    assert lines[-1]["step"] == 3 and all(r["loss"] > 0 for r in lines[:-1])


# ---------------------------------------------------------------------------------------------------------------
# Units: schedule, parameter groups, data order, texts


def test_vqa_finetune_on_a_decoder_llm(assets, tmp_path):
    """VQA lines train through OPT with each question masked out of the loss; caption files are refused."""
    questions = tmp_path / "vqa.jsonl"
    names = sorted(p.name for p in assets["images"].glob("*.jpg"))
    questions.write_text("".join(json.dumps({"image": n, "question": "What is in the picture?",
                                             "answers": ["a photo", "a photo", "nothing"]}) + "\n" for n in names))
    sets = sets_for(assets, 2, **{"task": "vqa", "stage": 0, "model.llm.name": assets["opt"],
                               "model.qformer.text": "false", "data.train[0].kind": "jsonl",
                               "data.train[0].path": questions, "data.val": "[]"})
    lines = run_cli(["finetune", str(RECIPE), "--out", str(tmp_path / "vqa"), "--json", *sets])
    assert lines[-1]["step"] == 2
    caption_file = ["--set", "data.train[0].kind=coco", "--set", f"data.train[0].path={assets['captions']}"]
    wrong = runner.invoke(app, ["finetune", str(RECIPE), "--out", str(tmp_path / "x"), *sets, *caption_file])
    assert wrong.exit_code == 2 and "data.train: vqa needs jsonl sources" in wrong.stderr
