"""int8 x int8 linear layers for inference on a CPU: PyTorch's dynamic quantized linear (fbgemm), with
LLM.int8()'s outlier decomposition.

A model loaded to run (`load_model`, load.fill) takes its frozen towers' int8 layers, ViT's and LLM's, from
here: each weight is quantized as it streams from the checkpoint (symmetric int8, one scale per output row) and
packed at once into fbgemm's layout, which alone holds it. A call quantizes the input on the fly (uint8 over the
tensor's min..max; 7 bits on CPUs without VNNI, whose 16-bit pair sums could saturate) and multiplies in int8
with int32 sums: `torch.ops.quantized.linear_dynamic`.
Measured on this 2-core Xeon, the decoder linears of the benchmark's OPT-125m-shaped LLM (LM head excluded),
one decoding step, ms:

    rows                           1       5      40
    fp32 (nn.Linear)            21.7    34.5    64.9
    torchao int8 weight-only    36.0    36.2    92.6   (dequantizes, then an fp32 product)
    torchao int8 x int8         50.4    34.4    52.9
    fbgemm int8 x int8           9.4     9.5    20.3

and at the ViT's 257 rows per image 2x fp32 (oneDNN's int8 engine, through the same op, lost at 1-40 rows).
PyTorch 2.14 deprecates its quantized tensors, which this op takes; where the op is gone (`available`), the
torchao layers stay.

Outliers: a few hidden features of OPT's residual stream grow far beyond the rest (LLM.int8(), Dettmers et al.
2022), and one input scale for the whole tensor would flatten every other feature. As LLM.int8() does, the input
features with any |x| > 6.0 are multiplied apart, in fp32, by the dequantized columns of W that they meet; the
rest goes through int8. With no such feature (one max over the input finds out) it costs nothing more.

fbgemm's kernels have no backward: where a gradient must reach the input (stage 2 against a model that
load_model loaded), the layer multiplies by its dequantized W instead, unpacked for that call. Models built to
train (`blip2 pretrain`, `finetune`) take torchao's weight-only layers (model/quantize.py).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# 7-bit inputs where AVX2's 16-bit pair sums (vpmaddubsw) could saturate; VNNI sums into 32 bits, so 8 bits there
REDUCE_RANGE = not (hasattr(torch.cpu, "_is_vnni_supported") and torch.cpu._is_vnni_supported())
THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, as bitsandbytes' Linear8bitLt uses it on CUDA (quantize.py)


def available() -> bool:
    """fbgemm's kernels are in this torch (x86 builds)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


@contextmanager
def _engine(name: str):
    """PyTorch picks the packed form by its process-wide quantized engine: this one, for one prepack."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class Int8Linear(nn.Module):
    """y = x W^T + b with W as int8 values and one fp32 scale per output row (W ~ qdata * scale), held only in
    fbgemm's prepacked form (the int8 values are not kept twice)."""

    MAX_CACHED = 64  # outlier columns of W kept dequantized; beyond that they are unpacked at each call

    def __init__(self, qdata: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qdata.shape
        self.register_buffer("scale", scale.reshape(-1).to(torch.float32), persistent=False)
        # the checkpoint's bias, which load.fill may assign after the weight was packed: added after the product
        # rather than packed with it, so that each layer is packed as it loads (packing torchao's layers once all
        # had loaded left their memory resident: 1.66x the int8 ViT-g's size after loading, against 1.07x)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=True)
        with warnings.catch_warnings():  # torch 2.14 deprecates quantized tensors; the op is PyTorch's own
            warnings.simplefilter("ignore", UserWarning)
            weight = torch._make_per_channel_quantized_tensor(
                qdata.contiguous(), self.scale.double(), torch.zeros_like(self.scale, dtype=torch.long), 0)
        with _engine("fbgemm"):  # not "x86": on VNNI CPUs it packs for oneDNN and keeps a second copy for unpacking
            self._packed = torch.ops.quantized.linear_prepack(weight, None)
        self._columns: dict[int, Tensor] = {}  # outlier feature -> W[:, feature] in fp32
        self._l1: Tensor | None = None  # ||q_i||_1 per output row, for `bounded`

    @property
    def weight(self) -> Tensor:
        """A stand-in with W's shape and dtype int8 (transformers reads `.weight.dtype`, as T5's `wo` does; int8
        tells it not to cast its input). The values live in the packed form only."""
        return self.scale.new_empty((self.out_features, self.in_features), dtype=torch.int8, device="meta")

    @property
    def packed_bytes(self) -> int:
        """The int8 values held in fbgemm's form (its padding and column sums aside)."""
        return self.out_features * self.in_features

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # a gradient to the input (stage 2 on a loaded model)
            return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        dtype = x.dtype
        x = x.to(torch.float32)
        low, high = torch.aminmax(x)  # one pass: most calls have no outlier at all
        if max(-float(low), float(high)) <= THRESHOLD:
            y = torch.ops.quantized.linear_dynamic(x, self._packed, REDUCE_RANGE)
        else:
            outliers = (x.reshape(-1, self.in_features).abs().amax(dim=0) > THRESHOLD).nonzero().squeeze(1)
            rest = x.clone()
            rest[..., outliers] = 0
            y = torch.ops.quantized.linear_dynamic(rest, self._packed, REDUCE_RANGE)
            y += x[..., outliers] @ self._outlier_columns(outliers.tolist()).t()
        if self.bias is not None:
            y += self.bias
        return y.to(dtype)

    def bounded(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """y as `forward` computes it (inference), and for each element a bound on |y - x W0^T - b|, W0 being the
        fp32 weight this layer was quantized from (model/screened_head.py screens an argmax with it).

        The error has two parts. W's values are rounded to the nearest multiple of their row's scale s_i, off by at
        most s_i / 2 each: at most s_i / 2 * ||x||_1 in all. The input's values, the outlier features aside (they
        meet dequantized columns in fp32), are quantized over the tensor's range with one step s_x = range / 255
        (127 with 7 bits); with the zero point rounded to an integer, a value is off by at most one step, and it
        meets W's int8 values: at most s_i * s_x * ||q_i||_1. The int32 sums are exact; fp32 rounding in the
        outlier part and in the fp32 reference's own sums is at most in_features x 2^-24 of sum |w x| <=
        127 s_i ||x||_1 each (2% of s_i ||x||_1 covers both up to ~1300 features; wider layers take more), and
        1e-5 of |y| covers the additions after."""
        flat = x.reshape(-1, self.in_features).to(torch.float32)
        y = self.forward(flat)
        outliers = flat.abs().amax(dim=0) > THRESHOLD
        rest = flat.masked_fill(outliers, 0.0) if bool(outliers.any()) else flat
        low, high = torch.aminmax(rest)
        step = (max(float(high), 0.0) - min(float(low), 0.0)) / (127 if REDUCE_RANGE else 255)
        rounding = max(0.02, 2 * self.in_features * 2.0**-24 * 127)
        input_part = (0.5 + rounding) * flat.abs().sum(dim=1, keepdim=True)  # (rows, 1)
        weight_part = 1.01 * step * (self._row_l1() + 8.0)  # (out,): the 8 steps cover the rescaling's rounding
        bound = self.scale * (input_part + weight_part) + 1e-5 * (y.abs() + 1.0)
        shape = (*x.shape[:-1], self.out_features)
        return y.reshape(shape), bound.reshape(shape)

    def _row_l1(self) -> Tensor:
        """||q_i||_1 for each output row (fp32), computed once."""
        if self._l1 is None:
            weight = torch.ops.quantized.linear_unpack(self._packed)[0]
            self._l1 = weight.int_repr().abs().sum(dim=1, dtype=torch.int32).to(torch.float32)
        return self._l1

    def dequantized(self) -> Tensor:
        """W in fp32 (out, in), unpacked for this call only."""
        return torch.ops.quantized.linear_unpack(self._packed)[0].dequantize()

    def _outlier_columns(self, features: list[int]) -> Tensor:
        """W[:, features] dequantized (out, n), from the cache or unpacked from fbgemm's form."""
        missing = [f for f in features if f not in self._columns]
        if missing:
            weight = torch.ops.quantized.linear_unpack(self._packed)[0]  # a qint8 per-row quantized tensor
            columns = weight.int_repr()[:, missing].to(torch.float32) * self.scale[:, None]
            if len(self._columns) + len(missing) > self.MAX_CACHED:
                every = dict(zip(missing, columns.t()))
                return torch.stack([self._columns.get(f, every.get(f)) for f in features], dim=1)
            self._columns.update(zip(missing, columns.t().clone()))
        return torch.stack([self._columns[f] for f in features], dim=1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def from_weight(weight: Tensor, bias: Tensor | None) -> Int8Linear:
    """The Int8Linear of an fp32 weight (out, in): symmetric int8 values, one scale per output row (max |w| / 127,
    as torchao's int8 layers; model/quantize.py)."""
    weight = weight.detach().to(torch.float32)
    scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        qdata = torch.quantize_per_channel(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0,
                                           torch.qint8).int_repr()
    return Int8Linear(qdata, scale, bias)
