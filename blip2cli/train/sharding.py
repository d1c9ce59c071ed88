"""Sharding the frozen towers across processes (`train.fsdp`), so a large ViT or LLM is held once per node
group instead of once per process.

BLIP-2's memory is in parts that never train: the ViT-g (1B parameters) and the LLM (2.7B to 11B). Each of
their repeated blocks (the ViT's `blocks`, the LLM's `_no_split_modules` layers) becomes a FSDP2 unit
(`torch.distributed.fsdp.fully_shard`): every process keeps 1/N of each block's weights and gathers a block
only while it runs (forward, and backward through the LLM in stage 2). FSDP2 shards per parameter, so frozen
weights need no `use_orig_params` workaround (ecosystem §FSDP). Embeddings, norms and heads outside the blocks
stay whole: they are small, and an LLM's tied input/output embedding cannot be split between two units.

The trained parts (Q-Former, projections, a trained ViT) stay ordinary tensors under Accelerate's DDP, which is
told to leave the sharded weights alone; checkpoints, the optimizer and gradient clipping see only ordinary
tensors. Accelerate 1.15 applies its own FSDP plugin to GPU processes only, which is why this is done here: the
same code shards on GPUs (NCCL) and CPUs (gloo).

Every process must run a sharded block the same number of times (each run is a collective). Training batches
and validation rounds are equal per rank; the feature cache is not (a rank may find all its rows cached), so a
cached ViT stays whole.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from blip2cli.model.blip2 import Blip2


def frozen_blocks(model: Blip2, with_vision: bool) -> list[nn.Module]:
    """The repeated blocks of the frozen towers, in forward order."""
    blocks: list[nn.Module] = []
    vision = model.vision
    if with_vision and vision.frozen:
        tower = vision.tower
        found = getattr(tower, "blocks", None)
        if found is None:
            found = getattr(getattr(tower, "model", None), "blocks", None)  # timm
        blocks.extend(found if found is not None else [])
    if model.llm is not None:
        lm = model.llm.model
        kinds = set(getattr(lm, "_no_split_modules", None) or [])
        blocks.extend(m for m in lm.modules() if type(m).__name__ in kinds)
    return blocks


def shard_frozen(model: Blip2, device: torch.device, with_vision: bool = True) -> int:
    """Shard the frozen blocks over the default process group, on `device`; returns the parameters sharded."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns, on every forward, that a block returns a view (OPT's layer ends with `.view(shape)`): an
    # in-place op on it would skip the backward all-gather. The next layer only reads it; the gradients equal
    # DDP's (tests/test_train.py), so the warning is silenced for this process.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    count = 0
    for block in frozen_blocks(model, with_vision):
        if any(p.requires_grad for p in block.parameters()):
            continue  # only frozen weights are sharded; trained ones stay under DDP
        count += sum(p.numel() for p in block.parameters())
        fully_shard(block, mesh=mesh)
    return count


def sharded_names(module: nn.Module) -> list[str]:
    """Parameter names (as `module` names them) held as shards, which DDP must neither broadcast nor reduce."""
    from torch.distributed.tensor import DTensor

    return [name for name, p in module.named_parameters() if isinstance(p, DTensor)]


def ignore_in_ddp(module: nn.Module) -> None:
    """Tell DistributedDataParallel (wrapped around `module` later, by Accelerate) to skip the shards."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sharded_names(module))


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a shard (a collective: every process calls it), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
