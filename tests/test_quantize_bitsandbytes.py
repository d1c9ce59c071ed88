"""The CUDA quantization path (bitsandbytes: LLM.int8() `Linear8bitLt`, NF4 `Linear4bit`) run on a CPU with
bitsandbytes' CPU kernels, through load_model(..., backend="bitsandbytes") on tiny offline OPT and Flan-T5
models 64 wide (bitsandbytes' CPU NF4 takes only layers of a multiple of 64 inputs). What only a GPU runs (the
compute capability check) is tested with torch.cuda patched."""

from __future__ import annotations

import logging
import math
import subprocess
import sys

import pytest
import torch

from blip2cli.config import GenerationOptions
from blip2cli.errors import UsageError
from blip2cli.model import quantize as Q
from blip2cli.model.load import load_model
from blip2cli.model.placement import placement
from tests import tiny
from tests.quantized import assert_stage2_trains_exactly_the_trainable_parts, teacher_forced_logits

bnb = pytest.importorskip("bitsandbytes", reason='bitsandbytes is not installed (pip install "blip2cli[test]")')

WIDTH = 64  # the towers' hidden size: every quantized layer has in_features 64 or 128
LAYER = {"int8": "Linear8bitLt", "int4": "Linear4bit"}
INT8_BOUND = 0.05  # LLM.int8() vs fp32 teacher-forced logits: max |difference| / max |fp32 logit| (as torchao's)
NF4_BOUND = 0.25  # NF4 vs fp32: 16 levels per 64-weight block (measured 0.15 on the tiny OPT)
NF4_KERNEL_BOUND = 0.02  # NF4 vs fp32 with the same NF4-rounded weights: the bf16 compute alone (measured 0.006)
NF4_TABLES = 4 * (16 + 256 + 1)  # bytes per NF4 layer: its code table, the nested code table and offset (fp32)
OPTIONS = GenerationOptions(num_beams=2, max_new_tokens=3, min_new_tokens=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    return {"opt": tiny.opt_model(tmp_path_factory.mktemp("opt64"), width=WIDTH),
            "t5": tiny.t5_model(tmp_path_factory.mktemp("t5-64"), width=WIDTH)}


def _load(directory, kind: str):
    return load_model(str(directory), "cpu", "float32", quantize=kind, backend="bitsandbytes")




def _error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max()).item()


# ------------------------------------------------------------------------------------------- backend selection


def test_the_device_picks_the_backend_unless_told():
    assert Q.backend_for(torch.device("cpu")) == "torchao"
    assert Q.backend_for(torch.device("cuda")) == "bitsandbytes"
    assert placement("cpu", "float32", "int8").backend == "torchao"
    assert placement("cpu", "float32", "int4", backend="bitsandbytes").backend == "bitsandbytes"
    Q.check("int4", torch.device("cpu"), "bitsandbytes")  # NF4 on a CPU through bitsandbytes: allowed
    with pytest.raises(UsageError, match="int4 needs a CUDA GPU"):
        Q.check("int4", torch.device("cpu"), "torchao")
    with pytest.raises(UsageError, match="expected torchao or bitsandbytes, got 'gptq'"):
        Q.check("int8", torch.device("cpu"), "gptq")
    with pytest.raises(UsageError, match="torchao runs on a CPU only"):
        Q.check("int8", torch.device("cuda"), "torchao")


def test_the_compute_capability_check_applies_only_on_cuda(monkeypatch):
    capability = {"value": (6, 1)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    Q.check("int8", torch.device("cpu"), "bitsandbytes")  # a CPU has no compute capability to check
    with pytest.raises(UsageError, match="compute capability 6.1.*7.5 or newer"):
        Q.check("int8", torch.device("cuda"))
    capability["value"] = (7, 5)  # Turing: the oldest bitsandbytes' int8 matmul runs on
    Q.check("int4", torch.device("cuda"))


def test_missing_bitsandbytes_on_a_cpu_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UsageError, match=r'with bitsandbytes needs bitsandbytes: pip install "blip2cli\[bitsan'):
        Q.check("int8", torch.device("cpu"), "bitsandbytes")


# --------------------------------------------------------------------------------------------- loaded models


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("which", ["opt", "t5"])
def test_bitsandbytes_layers_where_torchao_puts_int8_and_fp32_elsewhere(which, kind, models):
    model = _load(models[which], kind)
    fp32 = load_model(str(models[which]), "cpu", "float32")
    expected = {n for n, m in fp32.named_modules() if Q.is_quantized_linear(n, m)}  # the towers' linears, less
    quantized = {n: m for n, m in model.named_modules() if Q.is_quantized_module(m)}  # lm_head and T5's wo
    assert set(quantized) == expected and expected
    assert {type(m).__name__ for m in quantized.values()} == {LAYER[kind]}
    assert any(n.startswith("vision.tower.") for n in quantized) and any(n.startswith("llm.") for n in quantized)
    kept = {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert {"llm.model.lm_head", "llm_proj"} <= set(kept) and any(n.startswith("qformer.") for n in kept)
    if which == "t5":
        assert [n for n in kept if n.endswith(".wo")]  # Flan-T5's feed-forward outputs overflow in low precision
    for name, p in model.named_parameters():
        if name.endswith(".weight") and name.removesuffix(".weight") in quantized:
            assert p.dtype == (torch.int8 if kind == "int8" else torch.uint8), name
        else:  # the Q-Former, query tokens, ln_vision, projections, LM head, wo, norms and every bias
            assert p.dtype == torch.float32 and type(p) is torch.nn.Parameter, name
        if name.startswith(("vision.tower.", "llm.model.")):
            assert not p.requires_grad, name  # a frozen tower's biases too
    assert Q.describe(model) == {"quantized": len(expected), "full_precision": len(kept)}
    assert model.quantize == kind and model.fingerprint.endswith(f":{kind}")


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("which", ["opt", "t5"])
def test_bitsandbytes_models_caption_and_answer_quietly(which, kind, models, caplog):
    model = _load(models[which], kind)
    with caplog.at_level(logging.WARNING):
        captions = model.generate(tiny.pixels(2), ["", ""], OPTIONS)
        answers = model.generate(tiny.pixels(2), ["Question: what is it? Short answer:"] * 2, OPTIONS)
    assert len(captions) == len(answers) == 2 and all(isinstance(t[0], str) for t in captions + answers)
    if which == "t5":  # the tiny OPT's captions are often nothing but its end of line
        assert all(t[0].strip() for t in captions + answers)
    assert [r.getMessage() for r in caplog.records] == []  # LLM.int8()'s "inputs will be cast" once per matmul


def test_importing_bitsandbytes_logs_nothing():
    """Its CPU backend logs a missing optional kernel package at import; `blip2 caption` must stay quiet."""
    code = ("import torch; from blip2cli.model import quantize; "
            "quantize.check('int4', torch.device('cpu'), 'bitsandbytes')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_logits_are_within_the_bounds_of_fp32(models):
    px, texts = tiny.pixels(2), ["a dog running on the beach", "two cats on a pink blanket"]
    fp32 = load_model(str(models["opt"]), "cpu", "float32")
    nf4_model = _load(models["opt"], "int4")
    with torch.no_grad():
        ref = teacher_forced_logits(fp32, px, texts)
        int8 = teacher_forced_logits(_load(models["opt"], "int8"), px, texts)
        rounded = _with_nf4_weights(fp32, nf4_model)  # fp32 compute, the weights as NF4 rounds them
        nf4 = teacher_forced_logits(nf4_model, px, texts)  # (after: a CPU forward repacks the ViT's weights)
        assert 0 < _error(nf4, rounded) < NF4_KERNEL_BOUND  # bitsandbytes' CPU kernels multiply correctly
    assert 0 < _error(int8, ref) < INT8_BOUND
    assert (int8.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert 0 < _error(nf4, ref) < NF4_BOUND


def _with_nf4_weights(fp32, nf4_model):
    """Teacher-forced logits of `fp32` with each NF4 layer's weight replaced by its dequantized NF4 weight (`fp32`
    is changed)."""
    layers = {n: m for n, m in nf4_model.named_modules() if type(m).__name__ == "Linear4bit"}
    for name, module in fp32.named_modules():
        if name in layers:
            q = layers[name].weight
            module.weight.copy_(bnb.functional.dequantize_4bit(q.data, q.quant_state).float())
    return teacher_forced_logits(fp32, tiny.pixels(2), ["a dog running on the beach", "two cats on a pink blanket"])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_stage2_through_a_bitsandbytes_llm_trains_exactly_the_trainable_parts(kind, models):
    """After a no-grad pass (a validation caption) too: bitsandbytes repacks CPU NF4 layers for inference then."""
    model = _load(models["opt"], kind)
    model.generate(tiny.pixels(1), [""], GenerationOptions(num_beams=1, max_new_tokens=2))
    assert_stage2_trains_exactly_the_trainable_parts(model)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_bytes_count_each_scale_once(kind, models):
    model = _load(models["opt"], kind)
    layers = {n: m for n, m in model.named_modules() if Q.is_quantized_module(m)}
    fp32_bytes = quantized = 0
    for name, m in layers.items():
        n, rows = m.in_features * m.out_features, m.out_features
        bias = 0 if m.bias is None else m.bias.numel() * 4
        if kind == "int8":  # int8 values and one fp32 scale per row (SCB)
            expected = n + 4 * rows + bias
        else:  # 4-bit values, one uint8 scale per 64 weights, those scales' own fp32 scale per 256, the tables
            expected = n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + NF4_TABLES + bias
        assert Q.quantized_bytes(m) == expected, name
        fp32_bytes, quantized = fp32_bytes + 4 * n + bias, quantized + expected
    assert quantized < (0.28 if kind == "int8" else 0.2) * fp32_bytes  # about 1/4 and 1/8 plus the scales
    if kind == "int8":  # after a matmul LLM.int8() holds the int8 data and the scales under a second name
        before = Q.quantized_bytes(model)
        model.generate(tiny.pixels(1), [""], GenerationOptions(num_beams=1, max_new_tokens=2))
        assert all(m.state.SCB is not None for m in layers.values()) and Q.quantized_bytes(model) == before


def test_nf4_on_a_cpu_refuses_layers_its_kernel_cannot_take(tiny_opt_dir):
    """bitsandbytes' CPU NF4 kernel (AVX512-BF16 CPUs) repacks weights in 64-input and 32-output blocks: the
    32-wide default tiny model fails there, so it is refused everywhere, in one line, before anything runs."""
    with pytest.raises(UsageError, match="multiple of 64 inputs and 32 outputs, not 32 -> ") as err:
        _load(tiny_opt_dir, "int4")
    assert "\n" not in str(err.value)
    parent = torch.nn.Module()
    for shape, refused in (((64, 40), True), ((96, 64), True), ((128, 64), False)):
        parent.fc = torch.nn.Linear(*shape)
        if refused:
            with pytest.raises(UsageError, match="int4 on a CPU"):
                Q.quantize_linear(parent, "fc", parent.fc, "int4", torch.device("cpu"), False, "bitsandbytes")
        else:
            Q.quantize_linear(parent, "fc", parent.fc, "int4", torch.device("cpu"), False, "bitsandbytes")
            assert type(parent.fc).__name__ == "Linear4bit" and not parent.fc.bias.requires_grad
