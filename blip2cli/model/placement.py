"""Where each part of the model lives and in which dtype (HF modeling_blip_2)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from blip2cli.errors import UsageError


@dataclass(frozen=True)
class Placement:
    device: torch.device
    vision: torch.dtype  # frozen image tower
    llm: torch.dtype  # frozen language model
    quantize: str = "none"  # none|int8|int4: the frozen towers' linear layers (model/quantize.py)
    backend: str | None = None  # torchao|bitsandbytes: what quantizes them; None: quantize.backend_for(device)
    inference: bool = False  # loaded to run, not to train: CPU int8 layers take int8 x int8 kernels (int8_linear.py)
    # The Q-Former, query tokens, ln_vision and projections always stay fp32 (HF modeling_blip_2).


def placement(device: str = "auto", dtype: str = "auto", quantize: str = "none", backend: str | None = None,
              inference: bool = False, t5: bool = False) -> Placement:
    """Accelerate picks the device for "auto". Frozen towers: bf16 on GPUs that have it (else fp16), fp32 on
    CPU (no fp16 LayerNorm there, HF modeling_blip_2). Flan-T5 is never fp16 (NaNs, transformers #23918). `quantize`
    and its `backend` (None: the device's, quantize.backend_for) are checked here, before anything loads."""
    if device == "auto":
        from accelerate import PartialState

        dev = PartialState().device
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device: unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available on this machine")
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        if dev.type == "cuda":
            tower = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            tower = torch.float32
    elif dtype in names:
        tower = names[dtype]
    else:
        raise UsageError(f"--dtype: expected auto, float32, float16 or bfloat16, got {dtype!r}")
    llm = tower
    if t5 and tower == torch.float16:
        llm = torch.bfloat16 if dev.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float32
        warnings.warn("Flan-T5 does not run in float16 (it overflows): using " + str(llm).replace("torch.", ""))
    from blip2cli.model.quantize import backend_for, check

    check(quantize, dev, backend)
    return Placement(dev, tower, llm, quantize, backend or backend_for(dev), inference)


def _target_dtype(name: str, tensor: Tensor, place: Placement) -> torch.dtype:
    if not tensor.is_floating_point():
        return tensor.dtype
    if name.startswith("vision.tower."):
        if re.search(r"\.norm\d\.", name):  # LayerNorms of the frozen tower stay fp32 (LAVIS eva_vit)
            return torch.float32
        return place.vision
    if name.startswith("llm.model."):
        return place.llm
    return torch.float32
