"""int8 x int8 linear layers for inference on a CPU: PyTorch's dynamic quantized linear (fbgemm), with
LLM.int8()'s outlier decomposition.

`--quantize int8` loads the frozen towers' linear layers as torchao int8 tensors, one layer at a time
(model/quantize.py); a model loaded for inference (load.finish) then hands each of them, ViT's and LLM's, to
this module, which keeps the same int8 values and per-row scales in fbgemm's prepacked layout only. A call
quantizes the input on the fly (uint8 over the tensor's min..max; 7 bits on CPUs without VNNI, whose 16-bit
pair sums could saturate) and multiplies in int8 with int32 sums: `torch.ops.quantized.linear_dynamic`.
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
load_model loaded), the layer multiplies by its dequantized W instead, unpacked for that call. Training built by
`blip2 pretrain` keeps torchao's weight-only layers (load.finish alone converts).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# 7-bit inputs where AVX2's 16-bit pair sums (vpmaddubsw) could saturate; VNNI sums into 32 bits, so 8 bits there
REDUCE_RANGE = not (hasattr(torch.cpu, "_is_vnni_supported") and torch.cpu._is_vnni_supported())
THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, as bitsandbytes' Linear8bitLt uses it on CUDA (quantize.py)


def available() -> bool:
    """fbgemm's kernels are in this torch (x86 builds)."""
    engines = torch.backends.quantized.supported_engines
    return ("fbgemm" in engines or "x86" in engines) and hasattr(torch.ops.quantized, "linear_dynamic")


class Int8Linear(nn.Module):
    """y = x W^T + b with W as int8 values and one fp32 scale per output row (W ~ qdata * scale), held only in
    fbgemm's prepacked form (the int8 values are not kept twice)."""

    MAX_CACHED = 64  # outlier columns of W kept dequantized; beyond that they are unpacked at each call

    def __init__(self, qdata: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qdata.shape
        scale = scale.reshape(-1).to(torch.float32)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32), persistent=False)
        with warnings.catch_warnings():  # torch 2.14 deprecates quantized tensors; the op is still PyTorch's own
            warnings.simplefilter("ignore", UserWarning)
            weight = torch._make_per_channel_quantized_tensor(qdata.contiguous(), scale.double(),
                                                              torch.zeros_like(scale, dtype=torch.long), 0)
        self._packed = torch.ops.quantized.linear_prepack(weight, self.bias)
        self._columns: dict[int, Tensor] = {}  # outlier feature -> W[:, feature] in fp32

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
            return torch.ops.quantized.linear_dynamic(x, self._packed, REDUCE_RANGE).to(dtype)
        outliers = (x.reshape(-1, self.in_features).abs().amax(dim=0) > THRESHOLD).nonzero().squeeze(1)
        rest = x.clone()
        rest[..., outliers] = 0
        y = torch.ops.quantized.linear_dynamic(rest, self._packed, REDUCE_RANGE)
        return (y + x[..., outliers] @ self._outlier_columns(outliers.tolist()).t()).to(dtype)

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


def from_torchao(linear: nn.Linear) -> Int8Linear | None:
    """The Int8Linear with `linear`'s int8 values and scales, if `linear` holds a symmetric per-row torchao int8
    weight; else None (bitsandbytes layers, other granularities)."""
    w = linear.weight
    if not hasattr(w, "__tensor_flatten__") or type(w).__name__ != "Int8Tensor":
        return None
    qdata, scale, zero = w.qdata, w.scale, getattr(w, "zero_point", None)
    if qdata.dim() != 2 or scale.numel() != qdata.shape[0] or (zero is not None and bool(zero.any())):
        return None
    return Int8Linear(qdata, scale, linear.bias)


def convert(model: nn.Module) -> int:
    """Replace each torchao int8 linear under `model` by an Int8Linear, one at a time (the torchao layer goes as
    soon as its replacement exists); returns how many."""
    done = 0
    for name in [n for n, m in model.named_modules() if type(m) is nn.Linear]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        fast = from_torchao(getattr(parent, child))
        if fast is not None:
            setattr(parent, child, fast)
            done += 1
    return done
