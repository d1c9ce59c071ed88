"""The frozen LLM's linear layers in oneDNN's packed weight layout, for decoding on a CPU.

A decoding step multiplies a handful of rows (batch x beams) by every weight matrix of the LLM. Stored as
nn.Linear keeps them (out, in), MKL's GEMM re-reads each matrix in cache-unfriendly order for such thin inputs;
oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`) is laid out for them. Measured per decoding
step of the benchmark's OPT-125m-shaped LLM (all linears and the LM head, fp32, 2 cores, best of 6):

    rows          1      5      8     40
    as stored   34.6   61.9   82.0  111.9  ms
    packed      39.3   42.9   47.5   90.4  ms

so decoding with at least two rows (beam search, a batch of greedy captions, several samples) packs. At one row
(greedy, batch 1) only the LM head changes layout (`transpose_head`): its (V, D) weight stored as the (D, V)
matrix's transpose, which MKL reads in one sweep. The benchmark's 50272 x 768 head, fp32, 2 cores, ms:

    rows          1      2      8     40
    as stored   12.3   12.1   37.7   34.2
    transposed   8.6   28.5   31.2   43.8
    packed      12.8   13.0   14.7   26.6

The other linears gain 5% at one row that way and lose 30% in the prompt pass (40 rows): they stay as stored.
Both layouts give the same sums in another order: fp32 rounding differs in the last bits, the tokens of the
benchmark and the tests do not.

Packing replaces each `nn.Linear` of the LLM by a `PackedLinear` holding the packed copy; the stored weight goes
(no second copy), except where it is shared (OPT ties its LM head to the input embeddings, which keep theirs).
Only models that `load_model` loads (never the ones training builds) allow it (`FrozenLLM.pack_for_decoding`);
oneDNN's op has no backward, so where a gradient must reach the input the layer takes the plain product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROW_HINT = 16  # the row count oneDNN lays the weights out for: one layout serves every step of a decode


def available(device: torch.device) -> bool:
    """oneDNN packing exists in this torch build and the model runs on its CPU."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """`linear`'s product, y = x W^T + b, from W in oneDNN's blocked layout. Inference only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROW_HINT)
        # `weight` as transformers reads it (T5 checks `wo.weight.dtype`): same shape and dtype, oneDNN's layout
        self.register_buffer("weight", packed, persistent=False)
        bias = linear.bias.detach() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # no backward through oneDNN's op: the plain product
            return F.linear(x, self.weight.to_dense(), self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def relu(self, x: Tensor) -> Tensor:
        """relu(forward(x)) with oneDNN's ReLU post-op: the same numbers (inference only)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "relu", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """As nn.Linear's: `weight` in the stored layout and `bias` (export_hf after a beam search)."""
        destination[prefix + "weight"] = self.weight.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packable(module: nn.Module) -> bool:
    """A plain fp32 nn.Linear (quantized layers, whose weights are tensor subclasses, keep their own kernels)."""
    return (type(module) is nn.Linear and type(module.weight) is nn.Parameter
            and module.weight.dtype == torch.float32 and not module.weight.is_meta)


def transpose_head(model: nn.Module) -> bool:
    """Store the LM head's weight (V, D) as the transpose of a contiguous (D, V) matrix, in place: the same
    parameter (OPT's input embeddings share it and read the same values), one sweep over memory per product at one
    row. The prompt pass keeps only its last position's logits, so the head never multiplies more rows there."""
    head = model.get_output_embeddings()
    if head is None or not packable(head) or head.weight.stride() == (1, head.weight.shape[0]):
        return False
    with torch.no_grad():
        head.weight.data = head.weight.data.t().contiguous().t()
    return True


def pack_linears(model: nn.Module) -> int:
    """Replace every packable nn.Linear under `model` by a PackedLinear, one at a time: each stored weight goes as
    soon as its packed copy exists (peak: one layer's extra copy); returns how many."""
    names = [name for name, m in model.named_modules() if packable(m)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, PackedLinear(getattr(parent, child)))
    return len(names)
