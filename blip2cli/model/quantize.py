"""8-bit and 4-bit weights for the frozen towers (`--quantize none|int8|int4`, recipes' `train.quantize`).

Only the linear layers of the frozen ViT and the frozen LLM are quantized, one layer at a time as its weight
streams from the checkpoint (load.fill). Full precision stays where BLIP-2 needs it: the Q-Former, query tokens,
`ln_vision` and the projections (never under `vision.tower.` / `llm.model.`), the LM head (every logit), and
Flan-T5's `wo` feed-forward outputs (they overflow in low precision; transformers keeps them fp32 too).

CPU (torchao, int8 only):
  ViT  int8 weights and int8 compute (activations quantized per row on the fly): 257 rows per image make the
       int8 GEMM pay (2.5x an fp32 GEMM at ViT-B shapes on this AVX2 CPU).
  LLM  int8 weights, fp32 compute (dequantized inside the matmul): decoding multiplies 1-40 rows at a time,
       where quantizing the activations costs more than it saves; and gradients flow through it to the
       Q-Former when stage 2 trains against a quantized LLM.
  PyTorch's own `quantize_dynamic` was measured too (1.2-1.3x at decoding shapes, 1.2x at ViT shapes); it is
  deprecated in favour of torchao, swaps modules for ones without autograd (no stage 2 through them) and renames
  their state, so torchao it is. torchao's CPU int4 stores int4 values unpacked in int8 bytes (no memory gain)
  and runs slower than fp32, so int4 is CUDA-only.
CUDA (bitsandbytes): int8 = LLM.int8() (`Linear8bitLt`, outlier threshold 6.0), int4 = NF4 with double
  quantization and bf16 compute (`Linear4bit`): what transformers' load_in_8bit / load_in_4bit build.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

import torch
from torch import Tensor, nn

from blip2cli.errors import UsageError

Quantize = Literal["none", "int8", "int4"]
CHOICES: tuple[str, ...] = ("none", "int8", "int4")
QUANTIZED_PREFIXES = ("vision.tower.", "llm.model.")
_KEEP = re.compile(r"(^|\.)lm_head$|\.wo$")  # LM head; Flan-T5 DenseReluDense.wo / DenseGatedActDense.wo


def check(quantize: str, device: torch.device) -> None:
    """Refuse what cannot run, in one line saying what to use instead."""
    if quantize not in CHOICES:
        raise UsageError(f"--quantize: expected none, int8 or int4, got {quantize!r}")
    if quantize == "none":
        return
    if device.type == "cuda":
        _bitsandbytes(device)
    elif device.type == "cpu":
        if quantize == "int4":
            raise UsageError("--quantize int4 needs a CUDA GPU (bitsandbytes NF4); on a CPU use --quantize int8")
        _torchao()
    else:
        raise UsageError(f"--quantize {quantize}: not available on {device.type} devices; use --device cpu "
                         "(int8) or a CUDA GPU (int8, int4), or --quantize none")


def _torchao():
    logging.disable(logging.WARNING)  # torchao's import logs deprecation chatter about torch's pytree (2.14)
    try:
        import torchao.quantization as tq
    except ImportError:
        raise UsageError('--quantize int8 on a CPU needs torchao: pip install "blip2cli[quantize]" '
                         "(or pip install torchao), or use --quantize none") from None
    finally:
        logging.disable(logging.NOTSET)
    return tq


def _bitsandbytes(device: torch.device):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UsageError('--quantize on a CUDA GPU needs bitsandbytes: pip install "blip2cli[bitsandbytes]", '
                         "or use --quantize none") from None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (7, 5):  # bitsandbytes' int8 matmul needs Turing or newer
        raise UsageError(f"--quantize: this GPU (compute capability {major}.{minor}) has no int8 support in "
                         "bitsandbytes (it needs 7.5 or newer); use --quantize none with --dtype float16")
    return bnb


def is_quantized_linear(module_name: str, module: nn.Module) -> bool:
    """A linear layer of a frozen tower that is not one of the kept-in-full-precision outputs."""
    return (type(module) is nn.Linear and module_name.startswith(QUANTIZED_PREFIXES)
            and not _KEEP.search(module_name))


def frozen_prefixes(vision_frozen: bool) -> tuple[str, ...]:
    """Which towers to quantize: a trained ViT keeps full precision (its weights change every step)."""
    return QUANTIZED_PREFIXES if vision_frozen else ("llm.model.",)


def quantize_linear(parent: nn.Module, child: str, linear: nn.Linear, quantize: str, device: torch.device,
                    int8_compute: bool) -> None:
    """Replace `parent.<child>` (a filled nn.Linear) by its quantized form on `device`. `int8_compute`: quantize
    the activations too (CPU, many rows per matmul, no gradient needed through it)."""
    if device.type == "cuda":
        setattr(parent, child, _bnb_linear(linear, quantize, device))
        return
    tq = _torchao()
    config = tq.Int8DynamicActivationInt8WeightConfig() if int8_compute else tq.Int8WeightOnlyConfig()
    linear.weight.requires_grad_(False)
    tq.quantize_(linear, config)


def _bnb_linear(linear: nn.Linear, quantize: str, device: torch.device) -> nn.Module:
    bnb = _bitsandbytes(device)
    bias = linear.bias is not None
    weight = linear.weight.detach()
    if quantize == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(weight.to(torch.bfloat16), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
    q.weight = q.weight.to(device)  # quantized on its way to the GPU
    if bias and not linear.bias.is_meta:  # else the checkpoint's bias arrives later (load.fill assigns it)
        q.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return q


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take as stored (int8 data and scales of quantized layers)."""
    total = sum(getattr(m, "packed_bytes", 0) for m in model.modules())  # int8_linear.Int8Linear's packed values
    for t in list(model.parameters()) + list(model.buffers()):
        total += sum(x.numel() * x.element_size() for x in _plain(t))
    return total


def _plain(t: Tensor) -> list[Tensor]:
    if hasattr(t, "__tensor_flatten__"):  # a torchao tensor subclass: its int8 data and scales
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _plain(getattr(t, n))]
    return [t]


def describe(model: nn.Module) -> dict[str, int]:
    """Counts of quantized and full-precision linear layers (for messages and tests)."""
    quantized = kept = 0
    for _, m in model.named_modules():
        if is_quantized_module(m):
            quantized += 1
        elif type(m) is nn.Linear:
            kept += 1
    return {"quantized": quantized, "full_precision": kept}


def is_quantized_module(m: nn.Module) -> bool:
    if type(m) is nn.Linear:
        return hasattr(m.weight, "__tensor_flatten__")  # a torchao tensor subclass
    return type(m).__name__ in ("Linear8bitLt", "Linear4bit", "Int8Linear")  # bitsandbytes; int8_linear.py
