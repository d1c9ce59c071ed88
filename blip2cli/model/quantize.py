"""8-bit and 4-bit weights for the frozen towers (`--quantize none|int8|int4`, recipes' `train.quantize`).

Only the linear layers of the frozen ViT and the frozen LLM are quantized, one layer at a time as its weight
streams from the checkpoint (load.fill). Full precision stays where BLIP-2 needs it: the Q-Former, query tokens,
`ln_vision` and the projections (never under `vision.tower.` / `llm.model.`), the LM head (every logit), and
Flan-T5's `wo` feed-forward outputs (they overflow in low precision; transformers keeps them fp32 too).

CPU (int8 only): a model loaded to run takes int8 x int8 layers (PyTorch's dynamic quantized linear, fbgemm,
  with LLM.int8()'s outlier decomposition; model/int8_linear.py), 2.3-3.6x faster than fp32 at decoding shapes
  on this CPU and 2x at the ViT's. A model built to train takes torchao's (symmetric int8 weights, one scale per
  output row): ViT layers int8 x int8 (activations per row), LLM layers weight-only (dequantized inside an fp32
  product), through which stage 2's gradients reach the Q-Former; torchao's weight-only layers ran slower than
  fp32 while decoding and its int8 x int8 ones lost at 1-5 rows, hence the split. torchao's CPU int4 stores int4
  values unpacked in int8 bytes (no memory gain) and runs slower than fp32, so int4 is CUDA-only.
CUDA (bitsandbytes): int8 = LLM.int8() (`Linear8bitLt`, outlier threshold 6.0), int4 = NF4 with double
  quantization and bf16 compute (`Linear4bit`): what transformers' load_in_8bit / load_in_4bit build.

The device picks the backend (`backend_for`); library users and tests can name one (`backend="bitsandbytes"`
on a CPU runs the CUDA path's layers with bitsandbytes' CPU kernels, >= 0.50). bitsandbytes' CPU NF4 kernel
(AVX512-BF16 CPUs, in eval mode) repacks each weight in 64-wide blocks of inputs and 32-row blocks of outputs
and fails on other shapes, so NF4 on a CPU takes only layers whose in_features are a multiple of 64 and
out_features of 32 (as in every official BLIP-2); the LLM's layers, which stage 2 sends gradients through,
never take that layout (`_bnb_linear`).
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
Backend = Literal["torchao", "bitsandbytes"]
BACKENDS: tuple[str, ...] = ("torchao", "bitsandbytes")
QUANTIZED_PREFIXES = ("vision.tower.", "llm.model.")
_KEEP = re.compile(r"(^|\.)lm_head$|\.wo$")  # LM head; Flan-T5 DenseReluDense.wo / DenseGatedActDense.wo


def backend_for(device: torch.device) -> Backend:
    """What quantizes on `device` unless told otherwise: bitsandbytes on CUDA GPUs, torchao on CPUs."""
    return "bitsandbytes" if device.type == "cuda" else "torchao"


def check(quantize: str, device: torch.device, backend: Backend | None = None) -> None:
    """Refuse what cannot run, in one line saying what to use instead. `backend`: None is backend_for(device)."""
    if quantize not in CHOICES:
        raise UsageError(f"--quantize: expected none, int8 or int4, got {quantize!r}")
    if quantize == "none":
        return
    if device.type not in ("cuda", "cpu"):
        raise UsageError(f"--quantize {quantize}: not available on {device.type} devices; use --device cpu "
                         "(int8) or a CUDA GPU (int8, int4), or --quantize none")
    backend = backend or backend_for(device)
    if backend not in BACKENDS:
        raise UsageError(f"quantization backend: expected torchao or bitsandbytes, got {backend!r}")
    if backend == "bitsandbytes":
        _bitsandbytes(device)
    elif device.type == "cuda":
        raise UsageError(f"--quantize {quantize} with torchao runs on a CPU only; on a CUDA GPU use bitsandbytes")
    elif quantize == "int4":
        raise UsageError("--quantize int4 needs a CUDA GPU (bitsandbytes NF4); on a CPU use --quantize int8")
    else:
        _torchao()


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
    logging.disable(logging.WARNING)  # on a CPU its import logs that an optional kernel package is missing
    try:
        import bitsandbytes as bnb
    except ImportError:
        where = "on a CUDA GPU" if device.type == "cuda" else "with bitsandbytes"
        raise UsageError(f'--quantize {where} needs bitsandbytes: pip install "blip2cli[bitsandbytes]", '
                         "or use --quantize none") from None
    finally:
        logging.disable(logging.NOTSET)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (7, 5):  # bitsandbytes' int8 matmul needs Turing or newer
            raise UsageError(f"--quantize: this GPU (compute capability {major}.{minor}) has no int8 support in "
                             "bitsandbytes (it needs 7.5 or newer); use --quantize none with --dtype float16")
    # LLM.int8() logs one line per matmul whose input is not float16 (every matmul of an fp32 model on a CPU)
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_cast_notice)
    return bnb


def _not_cast_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def is_quantized_linear(module_name: str, module: nn.Module) -> bool:
    """A linear layer of a frozen tower that is not one of the kept-in-full-precision outputs."""
    return (type(module) is nn.Linear and module_name.startswith(QUANTIZED_PREFIXES)
            and not _KEEP.search(module_name))


def frozen_prefixes(vision_frozen: bool) -> tuple[str, ...]:
    """Which towers to quantize: a trained ViT keeps full precision (its weights change every step)."""
    return QUANTIZED_PREFIXES if vision_frozen else ("llm.model.",)


def quantize_linear(parent: nn.Module, child: str, linear: nn.Linear, quantize: str, device: torch.device,
                    int8_compute: bool, backend: Backend | None = None) -> None:
    """Replace `parent.<child>` (a filled nn.Linear) by its quantized form on `device`. `int8_compute`: quantize
    the activations too (torchao: CPU, many rows per matmul, no gradient needed through it; LLM.int8() always
    does). `backend`: None is backend_for(device)."""
    if (backend or backend_for(device)) == "bitsandbytes":
        setattr(parent, child, _bnb_linear(linear, quantize, device, int8_compute))
        return
    tq = _torchao()
    config = tq.Int8DynamicActivationInt8WeightConfig() if int8_compute else tq.Int8WeightOnlyConfig()
    linear.weight.requires_grad_(False)
    tq.quantize_(linear, config)


def _bnb_linear(linear: nn.Linear, quantize: str, device: torch.device, no_grad_through: bool) -> nn.Module:
    """`linear` as bitsandbytes' Linear8bitLt or Linear4bit on `device`, weight and bias frozen."""
    bnb = _bitsandbytes(device)
    bias = linear.bias is not None
    weight = linear.weight.detach()
    if quantize == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        if device.type == "cpu" and (linear.in_features % 64 or linear.out_features % 32):
            raise UsageError(f"--quantize int4 on a CPU (bitsandbytes NF4) needs layers of a multiple of 64 inputs "
                             f"and 32 outputs, not {linear.in_features} -> {linear.out_features}; use int8")
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(weight.to(torch.bfloat16), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
        if not no_grad_through:  # on a CPU, bitsandbytes repacks a layer for inference at its first no-grad
            q.support_avx512bf16_for_cpu = False  # forward; that layout takes no gradient (stage 2 after validation)
    q.weight = q.weight.to(device)  # quantized on its way to the device
    if bias and not linear.bias.is_meta:
        q.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    elif bias:  # the checkpoint's bias arrives later: load.fill assigns it, keeping this requires_grad
        q.bias.requires_grad_(False)  # a frozen tower's bias, like its weight
    return q


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take as stored: int8/int4 data and the scales of quantized layers, each tensor
    once (bitsandbytes keeps the same int8 data under two names after a layer's first matmul)."""
    seen: set[tuple[int, int]] = set()
    total = sum(getattr(m, "packed_bytes", 0) for m in model.modules())  # int8_linear.Int8Linear's packed values
    for t in [*model.parameters(), *model.buffers(), *_bnb_state(model)]:
        for x in _plain(t):
            key = (x.untyped_storage().data_ptr(), x.storage_offset()) if x.device.type != "meta" else (id(x), 0)
            if key not in seen:
                seen.add(key)
                total += x.numel() * x.element_size()
    return total


def _plain(t: Tensor) -> list[Tensor]:
    if hasattr(t, "__tensor_flatten__"):  # a torchao tensor subclass: its int8 data and scales
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _plain(getattr(t, n))]
    return [t]


def _bnb_state(model: nn.Module) -> list[Tensor]:
    """bitsandbytes' scales, kept outside parameters and buffers: LLM.int8()'s row scales (on the weight until the
    first matmul, on the layer's state after it) and NF4's quant_state (block scales, their own nested
    quantization, the code tables)."""
    found = []
    for m in model.modules():
        name = type(m).__name__
        if name == "Linear8bitLt":
            found += [x for x in (getattr(m.weight, "SCB", None), m.state.SCB, m.state.CB) if x is not None]
        elif name == "Linear4bit" and getattr(m.weight, "quant_state", None) is not None:
            qs = m.weight.quant_state
            for s in (qs, qs.state2 if qs.nested else None):
                if s is not None:
                    found += [x for x in (s.absmax, s.code, s.offset) if isinstance(x, Tensor)]
    return found


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
