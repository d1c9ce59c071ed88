"""LAVIS checkpoints as LAVIS really writes them (issue 10).

The key lists below are written down by hand from LAVIS's modules (lavis/models/blip2_models/Qformer.py: BertModel,
BertLayer, BertLMPredictionHead with `self.decoder.bias = self.bias`; blip2.py / blip2_qformer.py / blip2_opt.py:
Blip2Qformer and Blip2OPT; lavis/models/eva_vit.py: VisionTransformer), never derived from our name tables. The
values come from a tiny Hugging Face BLIP-2 through a hand-written LAVIS -> HF rename, so a LAVIS file loaded by
us must give the same features as the HF folder loaded by us (itself checked against transformers elsewhere).
LAVIS's runner saves `{"model", "optimizer", "config", "scaler", "epoch"}` and drops parameters that do not
require grad, but keeps buffers (position_ids) and the second names of tied tensors (decoder.weight/.bias).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.errors import UsageError
from blip2cli.model.load import load_model
from blip2cli.model.weights import read_safetensors
from tests import tiny

runner = CliRunner()
PAIR = ("weight", "bias")


def _linear(prefix: str) -> list[str]:
    return [f"{prefix}.{p}" for p in PAIR]


def _bert_attention(prefix: str) -> list[str]:  # BertAttention: self.{query,key,value}, output.{dense,LayerNorm}
    return [k for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
            for k in _linear(f"{prefix}.{m}")]


def lavis_qformer_keys(layers: int, cross_every: int, text: bool) -> list[str]:
    """Blip2Base.init_Qformer's BertLMHeadModel; Blip2OPT sets cls, word/position embeddings and each layer's
    text FFN (intermediate, output) to None, so stage-2 files lack them."""
    keys = _linear("Qformer.bert.embeddings.LayerNorm") + ["Qformer.bert.embeddings.position_ids"]
    if text:
        keys += ["Qformer.bert.embeddings.word_embeddings.weight", "Qformer.bert.embeddings.position_embeddings.weight"]
    for i in range(layers):
        layer = f"Qformer.bert.encoder.layer.{i}"
        keys += _bert_attention(f"{layer}.attention")
        if i % cross_every == 0:
            keys += _bert_attention(f"{layer}.crossattention")
        if text:
            keys += _linear(f"{layer}.intermediate.dense") + _linear(f"{layer}.output.dense")
            keys += _linear(f"{layer}.output.LayerNorm")
        keys += _linear(f"{layer}.intermediate_query.dense") + _linear(f"{layer}.output_query.dense")
        keys += _linear(f"{layer}.output_query.LayerNorm")
    if text:  # BertOnlyMLMHead: the decoder's weight and bias are second names of tied tensors
        keys += ["Qformer.cls.predictions.bias", *_linear("Qformer.cls.predictions.transform.dense"),
                 *_linear("Qformer.cls.predictions.transform.LayerNorm"), "Qformer.cls.predictions.decoder.weight",
                 "Qformer.cls.predictions.decoder.bias"]
    return keys


def lavis_stage1_keys(layers: int, cross_every: int) -> list[str]:  # Blip2Qformer without its frozen ViT
    return (["query_tokens", *_linear("ln_vision"), *_linear("vision_proj"), *_linear("text_proj"),
             *_linear("itm_head"), "temp"] + lavis_qformer_keys(layers, cross_every, text=True))


def lavis_stage2_opt_keys(layers: int, cross_every: int) -> list[str]:  # Blip2OPT without its frozen ViT and OPT
    return ["query_tokens", *_linear("ln_vision"), *_linear("opt_proj")] + lavis_qformer_keys(layers, cross_every,
                                                                                             text=False)


def lavis_eva_keys(depth: int) -> list[str]:  # eva_vit.VisionTransformer (qkv_bias: q_bias/v_bias, no k bias)
    keys = ["visual_encoder.cls_token", "visual_encoder.pos_embed", *_linear("visual_encoder.patch_embed.proj")]
    for i in range(depth):
        b = f"visual_encoder.blocks.{i}"
        keys += [*_linear(f"{b}.norm1"), f"{b}.attn.qkv.weight", f"{b}.attn.q_bias", f"{b}.attn.v_bias",
                 *_linear(f"{b}.attn.proj"), *_linear(f"{b}.norm2"), *_linear(f"{b}.mlp.fc1"), *_linear(f"{b}.mlp.fc2")]
    return keys


# LAVIS name -> the Hugging Face name holding the same tensor (by hand, from transformers' Blip2 modules).
TO_HF = (("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."),
         ("Qformer.bert.embeddings.word_embeddings.", "embeddings.word_embeddings."),
         ("Qformer.bert.embeddings.position_embeddings.", "embeddings.position_embeddings."),
         ("Qformer.bert.encoder.", "qformer.encoder."), ("ln_vision.", "vision_model.post_layernorm."),
         ("vision_proj.", "vision_projection."), ("text_proj.", "text_projection."),
         ("opt_proj.", "language_projection."), ("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
         ("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
         ("visual_encoder.patch_embed.proj.", "vision_model.embeddings.patch_embedding."),
         ("visual_encoder.blocks.", "vision_model.encoder.layers."))
IN_BLOCK = ((".attention.self.", ".attention.attention."), (".crossattention.self.", ".crossattention.attention."),
            (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.qkv.", ".self_attn.qkv."),
            (".attn.proj.", ".self_attn.projection."))


def lavis_file(keys: list[str], hf_dir: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict under LAVIS's `keys`, values from the HF checkpoint; the ITG head and temp (which HF lacks)
    random, the tied second names the very same tensors, as `state_dict()` returns them."""
    hf = read_safetensors(hf_dir / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key in keys:
        if key.endswith("position_ids"):
            state[key] = torch.arange(hf["embeddings.position_embeddings.weight"].shape[0] if
                                      "embeddings.position_embeddings.weight" in hf else 512)[None]
        elif key == "temp":
            state[key] = torch.tensor(0.05)
        elif key == "Qformer.cls.predictions.decoder.weight":
            state[key] = state["Qformer.bert.embeddings.word_embeddings.weight"]
        elif key == "Qformer.cls.predictions.decoder.bias":
            state[key] = state["Qformer.cls.predictions.bias"]
        elif key.startswith("Qformer.cls."):
            width = hf["query_tokens"].shape[-1]
            vocab = hf["embeddings.word_embeddings.weight"].shape[0]
            shape = (vocab,) if key.endswith("predictions.bias") else (width, width) if key.endswith(
                "dense.weight") else (width,)
            state[key] = 0.05 * torch.randn(shape, generator=g) + (1.0 if "LayerNorm.weight" in key else 0.0)
        elif key.endswith((".attn.q_bias", ".attn.v_bias")):
            fused = hf[_to_hf(key.rsplit(".", 1)[0] + ".qkv.bias")]
            q, _, v = fused.chunk(3)
            state[key] = (q if key.endswith("q_bias") else v).clone()
        else:
            state[key] = hf[_to_hf(key)].clone()
    return state


def _to_hf(key: str) -> str:
    for src, dst in TO_HF:
        if key.startswith(src):
            key = dst + key[len(src):]
            break
    for src, dst in IN_BLOCK:
        key = key.replace(src, dst)
    return key


def save_like_lavis_runner(state: dict[str, torch.Tensor], path: Path, config: dict | None = None) -> Path:
    """`RunnerBase._save_checkpoint`'s layout (optimizer state and the run config are plain containers)."""
    config = config if config is not None else {"model": {"arch": "blip2", "max_txt_len": 32, "image_size": 28}}
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
                "config": config, "scaler": None, "epoch": 3}, path)
    return path


def _features(model, texts=("a man and a chicken", "a dog")):
    with torch.no_grad():
        e = model.vision_embeds(tiny.pixels(2, seed=11))
        return model.image_features(e), model.text_features(list(texts)), model.itm_logits(e, list(texts))


def _same_features(a, b) -> bool:
    b.ln_vision.eps = a.ln_vision.eps  # LAVIS's ln_vision eps is 1e-5, HF's 1e-6 (LAVIS eva_vit)
    return all(torch.allclose(x, y, atol=1e-6) for x, y in zip(_features(a), _features(b)))


@pytest.fixture
def stage1(tmp_path: Path, tiny_retrieval_model_dir: Path) -> Path:
    """blip2_pretrained.pth as the runner saves it, and a model .yaml naming the ViT and tokenizer."""
    state = lavis_file(lavis_stage1_keys(layers=2, cross_every=2), tiny_retrieval_model_dir)
    save_like_lavis_runner(state, tmp_path / "checkpoint_9.pth")
    load_model(str(tiny_retrieval_model_dir), "cpu", "float32").tokenizer.save_pretrained(tmp_path / "tok")
    spec = tmp_path / "lavis.yaml"
    spec.write_text(f"checkpoint: checkpoint_9.pth\nvision: {tiny_retrieval_model_dir}\ntokenizer: tok\n")
    return spec


def test_a_stage1_file_as_the_runner_saves_it_loads(stage1: Path, tiny_retrieval_model_dir: Path) -> None:
    raw = torch.load(stage1.parent / "checkpoint_9.pth", weights_only=True)
    assert "Qformer.cls.predictions.decoder.bias" in raw["model"]  # the alias the issue was about
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lavis = load_model(str(stage1), "cpu", "float32")
    assert not [w for w in caught if "guessed" in str(w.message)]  # heads from the ViT's folder, length from config
    reference = load_model(str(tiny_retrieval_model_dir), "cpu", "float32")
    assert _same_features(reference, lavis)
    assert lavis.temp.item() == pytest.approx(0.05)
    assert torch.equal(lavis.qformer.cls.predictions.bias, raw["model"]["Qformer.cls.predictions.bias"])
    assert lavis.qformer.cls.predictions.decoder.weight is lavis.qformer.embeddings.word_embeddings.weight


def test_the_stage1_file_captions_through_the_cli(stage1: Path, tmp_path: Path) -> None:
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    result = runner.invoke(app, ["caption", str(tmp_path / "a.png"), "--model", str(stage1), "--device", "cpu",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert '"caption"' in result.stdout


def test_a_tied_alias_that_differs_is_refused_in_one_line(stage1: Path, tmp_path: Path) -> None:
    raw = torch.load(stage1.parent / "checkpoint_9.pth", weights_only=True)
    raw["model"]["Qformer.cls.predictions.decoder.bias"] = raw["model"]["Qformer.cls.predictions.bias"] + 1
    torch.save(raw, stage1.parent / "checkpoint_9.pth")
    with pytest.raises(UsageError, match="decoder.bias differs from Qformer.cls.predictions.bias"):
        load_model(str(stage1), "cpu", "float32")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "a.png")
    result = runner.invoke(app, ["caption", str(tmp_path / "a.png"), "--model", str(stage1), "--device", "cpu"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output


def test_a_stage2_opt_file_with_vision_and_llm_named(tmp_path: Path, tiny_opt_dir: Path) -> None:
    state = lavis_file(lavis_stage2_opt_keys(layers=2, cross_every=2), tiny_opt_dir)
    save_like_lavis_runner(state, tmp_path / "blip2_pretrained_opt.pth")
    reference = load_model(str(tiny_opt_dir), "cpu", "float32")
    reference.llm.model.save_pretrained(tmp_path / "opt")
    reference.llm.tokenizer.save_pretrained(tmp_path / "opt")
    (tmp_path / "m.yaml").write_text(f"checkpoint: blip2_pretrained_opt.pth\nvision: {tiny_opt_dir}\nllm: opt\n")
    lavis = load_model(str(tmp_path / "m.yaml"), "cpu", "float32")
    lavis.ln_vision.eps = reference.ln_vision.eps
    px = tiny.pixels(2, seed=8)
    with torch.no_grad():
        a = reference.llm.prompt_logits(reference.llm_prefix(reference.vision_embeds(px)), ["a photo of"] * 2)
        b = lavis.llm.prompt_logits(lavis.llm_prefix(lavis.vision_embeds(px)), ["a photo of"] * 2)
    assert (a - b).abs().max().item() <= 1e-5


@pytest.fixture
def finetuned(tmp_path: Path, tiny_retrieval_model_dir: Path) -> Path:
    """A retrieval fine-tune (blip2_coco): the trained ViT is in the file, so nothing names its head count."""
    keys = lavis_eva_keys(depth=2) + lavis_stage1_keys(layers=2, cross_every=2)
    save_like_lavis_runner(lavis_file(keys, tiny_retrieval_model_dir), tmp_path / "blip2_finetune_coco.pth",
                           config={})
    load_model(str(tiny_retrieval_model_dir), "cpu", "float32").tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path


def test_unstated_heads_and_length_are_guessed_with_one_note(finetuned: Path, tiny_retrieval_model_dir) -> None:
    (finetuned / "m.yaml").write_text("checkpoint: blip2_finetune_coco.pth\ntokenizer: tok\n")
    with pytest.warns(UserWarning) as caught:
        guessed = load_model(str(finetuned / "m.yaml"), "cpu", "float32")
    notes = [str(w.message) for w in caught if "guessed" in str(w.message)]
    assert len(notes) == 1, notes
    assert "ViT heads 1" in notes[0] and "Q-Former heads 1" in notes[0] and "max_text_len 32" in notes[0]
    reference = load_model(str(tiny_retrieval_model_dir), "cpu", "float32")
    assert not _same_features(reference, guessed)  # the tiny model has 4 heads: the guess is wrong, and said so
    Image.new("RGB", (40, 30), "red").save(finetuned / "a.png")
    result = runner.invoke(app, ["caption", str(finetuned / "a.png"), "--model", str(finetuned / "m.yaml"),
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0 and sum("guessed" in line for line in result.stderr.splitlines()) == 1


def test_the_model_file_states_the_architecture(finetuned: Path, tiny_retrieval_model_dir) -> None:
    (finetuned / "m.yaml").write_text("checkpoint: blip2_finetune_coco.pth\ntokenizer: tok\nvision_heads: 4\n"
                                      "qformer_heads: 4\nmax_text_len: 24\nimage_size: 28\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stated = load_model(str(finetuned / "m.yaml"), "cpu", "float32")
    assert not [w for w in caught if "guessed" in str(w.message)]
    assert (stated.cfg.vision.heads, stated.cfg.qformer.num_heads, stated.cfg.qformer.max_text_len) == (4, 4, 24)
    assert _same_features(load_model(str(tiny_retrieval_model_dir), "cpu", "float32"), stated)


@pytest.mark.parametrize("line,message", [("qformer_heads: 0", "qformer_heads: expected a positive integer"),
                                          ("vision_heads: five", "vision_heads: expected an integer"),
                                          ("qformer_heads: 5", "not divisible by 5 heads")])
def test_bad_stated_values_are_one_line(finetuned: Path, line: str, message: str) -> None:
    (finetuned / "m.yaml").write_text(f"checkpoint: blip2_finetune_coco.pth\ntokenizer: tok\n{line}\n")
    with pytest.raises(UsageError, match=message):
        load_model(str(finetuned / "m.yaml"), "cpu", "float32")
