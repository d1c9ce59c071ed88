"""--quantize: int8 frozen towers on tiny offline models (torchao on CPU), the kept-in-fp32 modules, stage 2
through a quantized LLM, the index's quantization check and every error path. CUDA (bitsandbytes) tests skip
without a GPU."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from blip2cli.cli import app
from blip2cli.config import GenerationOptions
from blip2cli.errors import UsageError
from blip2cli.model import quantize as Q
from blip2cli.model.load import load_model
from tests import tiny
from tests.quantized import assert_stage2_trains_exactly_the_trainable_parts, teacher_forced_logits

runner = CliRunner()
needs_torchao = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("torchao") is None,
    reason='torchao is not installed (pip install "blip2cli[quantize]"): the CPU int8 path cannot run')
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: bitsandbytes layers need one")
LOGIT_BOUND = 0.05  # int8 vs fp32 teacher-forced logits: max |difference| / max |fp32 logit|


def _kept(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and not Q.is_quantized_module(m)}




@needs_torchao
@pytest.mark.parametrize("which", ["opt", "t5"])
def test_int8_quantizes_the_towers_and_keeps_the_rest_fp32(which, tiny_opt_dir, tiny_t5_dir):
    model = load_model(str(tiny_opt_dir if which == "opt" else tiny_t5_dir), "cpu", "float32", quantize="int8")
    quantized = {n for n, m in model.named_modules() if Q.is_quantized_module(m)}
    assert quantized and all(n.startswith(("vision.tower.", "llm.model.")) for n in quantized)
    assert any(n.startswith("vision.tower.") for n in quantized) and any(n.startswith("llm.") for n in quantized)
    kept = _kept(model)
    assert "llm.model.lm_head" in kept and "llm_proj" in kept
    assert any(n.startswith("qformer.") for n in kept)
    if which == "t5":
        wo = [n for n in kept if n.endswith(".wo")]
        assert wo and not any(n.endswith(".wo") for n in quantized)  # Flan-T5 overflows otherwise
        assert any(n.endswith(".wi_0") for n in quantized)
    for name, module in kept.items():
        assert module.weight.dtype == torch.float32 and not Q.is_quantized_module(module), name
    for name, p in model.named_parameters():  # everything else (Q-Former, ln_vision, query tokens, norms) fp32
        if not hasattr(p, "__tensor_flatten__"):
            assert p.dtype == torch.float32, name
    assert model.ln_vision.weight.dtype == torch.float32 and model.query_tokens.dtype == torch.float32
    assert model.quantize == "int8" and model.fingerprint.endswith(":int8")
    modules = dict(model.named_modules())
    for name in quantized:  # int8 values and one scale per output row: about a quarter of fp32
        weight = modules[name].weight
        assert Q.quantized_bytes(modules[name]) - (modules[name].bias.numel() * 4 if modules[name].bias is not None
                                                   else 0) < 0.3 * weight.numel() * 4, name


@needs_torchao
def test_int8_logits_are_within_the_bound_of_fp32(tiny_opt_dir):
    fp32 = load_model(str(tiny_opt_dir), "cpu", "float32")
    int8 = load_model(str(tiny_opt_dir), "cpu", "float32", quantize="int8")
    px, texts = tiny.pixels(2), ["a dog running on the beach", "two cats on a pink blanket"]
    with torch.no_grad():
        ref, got = teacher_forced_logits(fp32, px, texts), teacher_forced_logits(int8, px, texts)
    error = (got - ref).abs().max() / ref.abs().max()
    assert 0 < error < LOGIT_BOUND, error  # quantized (not identical) and close
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.9, agree


@needs_torchao
@pytest.mark.parametrize("which", ["opt", "t5"])
def test_quantized_models_caption_and_answer(which, tiny_opt_dir, tiny_t5_dir):
    model = load_model(str(tiny_opt_dir if which == "opt" else tiny_t5_dir), "cpu", "float32", quantize="int8")
    options = GenerationOptions(num_beams=3, max_new_tokens=5, min_new_tokens=2)
    captions = model.generate(tiny.pixels(2), ["", ""], options)
    answers = model.generate(tiny.pixels(2), ["Question: what is it? Short answer:"] * 2, options)
    assert len(captions) == len(answers) == 2 and all(isinstance(t[0], str) for t in captions + answers)


@needs_torchao
def test_caption_and_ask_cli_take_quantize(tiny_opt_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    for args in (["caption", str(tmp_path / "red.png")], ["ask", str(tmp_path / "red.png"), "what colour?"]):
        result = runner.invoke(app, [*args, "--model", str(tiny_opt_dir), "--device", "cpu", "--quantize", "int8",
                                     "--max-new-tokens", "3", "--json"])
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout.splitlines()[-1])
        assert record["image"].endswith("red.png") and ("caption" in record or "answer" in record)


@needs_torchao
def test_stage2_through_a_quantized_llm_trains_exactly_the_trainable_parts(tiny_opt_dir):
    assert_stage2_trains_exactly_the_trainable_parts(load_model(str(tiny_opt_dir), "cpu", "float32", quantize="int8"))


@needs_torchao
def test_stage2_recipe_with_a_quantized_llm(tiny_opt_dir, tmp_path, monkeypatch):
    """`train.quantize: int8` goes through the training entry point: the LLM trained against is int8, and the
    saved weights are the trained parts in fp32 (and the random tower, which has no file to come from)."""
    from PIL import Image

    from blip2cli.model.weights import read_safetensors
    from blip2cli.train import loop

    built = []
    build = loop.build_for_training
    monkeypatch.setattr(loop, "build_for_training", lambda *a, **k: built.append(build(*a, **k)) or built[-1])

    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(["red", "green", "blue", "white"]):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.jpg")
    coco = {"images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(4)],
            "annotations": [{"id": i, "image_id": i, "caption": f"a {c} square"}
                            for i, c in enumerate(["red", "green", "blue", "white"])]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    qtok = tmp_path / "qtok"
    vocab = len(tiny.bert_tokenizer(qtok))
    sets = {"stage": 2, "model.qformer.tokenizer": qtok, "model.qformer.vocab_size": vocab,
            "model.vision.image_size": 28, "model.llm.name": tiny_opt_dir / "llm", "model.qformer.text": "false",
            "data.train[0].path": tmp_path / "captions.json", "data.train[0].image_root": images,
            "data.val[0].path": tmp_path / "captions.json", "data.val[0].image_root": images, "data.val_batches": 1,
            "train.max_steps": 2, "train.warmup_steps": 1, "train.global_batch_size": 4,
            "train.micro_batch_size": 4, "train.log_every": 1, "train.eval_every": 0, "train.save_every": 2,
            "train.quantize": "int8"}
    _save_llm(tiny_opt_dir, tiny_opt_dir / "llm")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml"
    args = ["pretrain", "--stage", "2", str(recipe), "--out", str(tmp_path / "run"), "--json"]
    result = runner.invoke(app, args + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")])
    assert result.exit_code == 0, result.output
    saved = read_safetensors(tmp_path / "run" / "final" / "model.safetensors")
    assert saved and not any(n.startswith("llm.model.") for n in saved)
    llm_layers = [m for n, m in built[0].named_modules() if n.startswith("llm.model.") and Q.is_quantized_module(m)]
    assert llm_layers and all(m.weight.dtype == torch.float32 for m in llm_layers)  # int8 data, fp32 dequantized
    assert all(t.dtype == torch.float32 for t in saved.values())


def _save_llm(hf_dir: Path, out: Path) -> None:
    """The tiny BLIP-2's OPT as a stand-alone LLM folder (what model.llm.name names)."""
    if (out / "config.json").is_file():
        return
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    Blip2ForConditionalGeneration.from_pretrained(hf_dir).language_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(out)


def test_index_refuses_vectors_of_another_quantization(tmp_path):
    from blip2cli.retrieval.store import Store, StoreInfo

    with Store.create(tmp_path / "idx", StoreInfo("m", "abc123:int8", 4, 16)) as store:
        store.check_model("m", "abc123:int8")  # the same quantization is fine
        for other, said in (("abc123", "not none"), ("abc123:int4", "not int4")):
            with pytest.raises(UsageError, match="built with --quantize int8") as err:
                store.check_model("m", other)
            assert said in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(UsageError, match="weights"):
            store.check_model("other", "fff999:int8")  # another model: the usual message


@needs_torchao
def test_index_cli_refuses_mixing_quantizations(tiny_retrieval_model_dir, tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for colour in ("red", "blue"):
        Image.new("RGB", (30, 30), colour).save(photos / f"{colour}.png")
    base = ["index", str(photos), "--index", str(tmp_path / "idx"), "--model", str(tiny_retrieval_model_dir),
            "--device", "cpu", "--json"]
    assert runner.invoke(app, base + ["--quantize", "int8"]).exit_code == 0
    Image.new("RGB", (30, 30), "green").save(photos / "green.png")  # something to embed: the model loads
    mixed = runner.invoke(app, base)
    assert mixed.exit_code == 2 and "--quantize int8" in mixed.output
    search = runner.invoke(app, ["search", "red", "--index", str(tmp_path / "idx"), "--no-rerank", "--device",
                                 "cpu", "--quantize", "int8", "--json"])
    assert search.exit_code == 0, search.output


# ---------------------------------------------------------------------------------------------------------- errors


def test_int4_on_a_cpu_is_one_line_saying_what_to_use():
    with pytest.raises(UsageError, match="int4 needs a CUDA GPU.*use --quantize int8"):
        Q.check("int4", torch.device("cpu"))


def test_unknown_quantization_and_device_are_refused():
    with pytest.raises(UsageError, match="expected none, int8 or int4"):
        Q.check("int3", torch.device("cpu"))
    with pytest.raises(UsageError, match="not available on mps"):
        Q.check("int8", torch.device("mps"))
    Q.check("none", torch.device("mps"))  # nothing to check


def test_missing_torchao_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(UsageError, match=r'pip install "blip2cli\[quantize\]"'):
        Q.check("int8", torch.device("cpu"))


def test_missing_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UsageError, match=r'pip install "blip2cli\[bitsandbytes\]"'):
        Q.check("int4", torch.device("cuda"))


def test_a_gpu_without_int8_support_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    with pytest.raises(UsageError, match="compute capability 6.1.*--quantize none"):
        Q.check("int8", torch.device("cuda"))


def test_cli_quantize_errors_exit_2_without_a_traceback(tiny_opt_dir, tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20), "red").save(tmp_path / "a.png")
    for value, said in (("int4", "needs a CUDA GPU"), ("fp8", "expected none, int8 or int4")):
        result = runner.invoke(app, ["caption", str(tmp_path / "a.png"), "--model", str(tiny_opt_dir), "--device",
                                     "cpu", "--quantize", value])
        assert result.exit_code == 2 and said in result.output and "Traceback" not in result.output


def test_recipe_refuses_quantize_with_fsdp():
    from blip2cli.config import TrainConfig

    with pytest.raises(UsageError, match="train.quantize"):
        TrainConfig(quantize="int8", fsdp=True)


# ------------------------------------------------------------------------------------------------------------ CUDA


@needs_cuda
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_bitsandbytes_layers_caption_on_a_gpu(kind, tiny_opt_dir, tiny_t5_dir):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    for directory in (tiny_opt_dir, tiny_t5_dir):
        model = load_model(str(directory), "cuda", "auto", quantize=kind)
        layers = {type(m).__name__ for m in model.modules()}
        assert ("Linear8bitLt" if kind == "int8" else "Linear4bit") in layers
        assert model.llm.model.lm_head.weight.dtype != torch.int8 and model.qformer.parameters().__next__().dtype \
            == torch.float32
        texts = model.generate(tiny.pixels(2).cuda(), ["", ""], GenerationOptions(num_beams=2, max_new_tokens=4))
        assert len(texts) == 2
