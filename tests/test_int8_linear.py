"""int8 x int8 inference layers for the CPU (model/int8_linear.py): fbgemm's product within a stated bound of the
fp32 product by the same int8 weights, LLM.int8()'s outlier features taken apart in fp32, gradients to the input,
and what `load_model(..., quantize="int8")` converts."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blip2cli.config import GenerationOptions
from blip2cli.model import int8_linear
from blip2cli.model import quantize as Q
from blip2cli.model.load import load_model
from tests import tiny

pytestmark = [
    pytest.mark.skipif(not int8_linear.available(), reason="this torch has no fbgemm/x86 quantized engine"),
    pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed"),
]
BOUND = 0.03  # max |int8 - fp32| / max |fp32| for N(0, 1) inputs: 7-bit inputs, per-row int8 weights


def _layer(out_features=96, in_features=64, seed=0):
    """An nn.Linear and its Int8Linear with per-row symmetric int8 weights; W_q is the dequantized weight."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    bias = torch.randn(out_features, generator=g) * 0.1
    scale = weight.abs().amax(dim=1) / 127
    qdata = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return int8_linear.Int8Linear(qdata, scale, bias), qdata.float() * scale[:, None], bias


@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 1, 64), (3, 7, 64)])
def test_within_the_bound_of_the_fp32_product(shape):
    layer, w, b = _layer()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, want = layer(x), F.linear(x, w, b)
    assert got.shape == want.shape
    error = float((got - want).abs().max() / want.abs().max())
    assert 0 < error < BOUND, error


def test_outlier_features_go_through_fp32():
    layer, w, b = _layer()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    x[:, 5] = 40.0  # an outlier feature, as OPT's residual stream has
    x[2, 17] = -9.0
    with torch.inference_mode():
        want = F.linear(x, w, b)
        got = layer(x)
        plain = torch.ops.quantized.linear_dynamic(x, layer._packed, int8_linear.REDUCE_RANGE) + b  # one input scale
    error, plain_error = (got - want).abs().max(), (plain - want).abs().max()
    assert error < plain_error / 4, (error, plain_error)
    assert float(error / want.abs().max()) < BOUND
    assert sorted(layer._columns) == [5, 17]  # cached for the next call
    torch.testing.assert_close(layer._columns[5], w[:, 5])


def test_the_outlier_cache_is_bounded():
    layer, w, b = _layer()
    layer.MAX_CACHED = 3
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    x[:, :6] = 20.0
    with torch.inference_mode():
        got, want = layer(x), F.linear(x, w, b)
    assert len(layer._columns) == 0
    assert float((got - want).abs().max() / want.abs().max()) < BOUND


def test_gradients_reach_the_input():
    layer, w, b = _layer()
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, 64))


def test_load_converts_the_llm_and_keeps_the_rest(tiny_opt_dir):
    model = load_model(str(tiny_opt_dir), "cpu", "float32", quantize="int8")
    fast = {n for n, m in model.named_modules() if isinstance(m, int8_linear.Int8Linear)}
    assert any(n.startswith("llm.model.") for n in fast) and any(n.startswith("vision.tower.") for n in fast)
    modules = dict(model.named_modules())
    assert fast == {n for n, m in modules.items() if Q.is_quantized_module(m)}  # no torchao layer left
    assert type(modules["llm.model.lm_head"]) is nn.Linear  # every logit in fp32
    fp32 = load_model(str(tiny_opt_dir), "cpu", "float32")
    saved = sum(3 * modules[n].in_features * modules[n].out_features - 4 * modules[n].out_features for n in fast
                if n.startswith("llm."))
    for name in fast:  # the checkpoint's biases arrived after the weights were packed
        bias = modules[name].bias
        if bias is not None:
            assert not bias.is_meta and torch.equal(bias, dict(fp32.named_modules())[name].bias), name
    assert Q.quantized_bytes(model.llm.model) == Q.quantized_bytes(fp32.llm.model) - saved  # int8 + fp32 row scales
    with torch.inference_mode():
        for beams in (1, 3):
            texts = model.generate(tiny.pixels(2), ["a photo of", ""], GenerationOptions(num_beams=beams,
                                                                                       max_new_tokens=6))
            assert len(texts) == 2 and all(len(t) == 1 for t in texts)
