"""Quantized expert stacks: a ``models.layers.moe.StackedExperts`` as int8 or int4 weights.

The formats are the linear layers' (``linear.py``), per expert: int8 codes (E, N, K) with one scale per
output row of each expert (E, N) (``quantize_int8`` over every expert's rows: row by row, so exactly
``Int8Linear``'s numbers per expert); int4 codes packed in the native layout (``kernels.pack_int4``:
(E, N, K / 2) uint8) with a bf16 scale and zero per ``group_size`` input columns (E, N, K / group, 2)
(``Int4Linear``'s "native" format per expert). The bias, if any, stays in the model dtype, as does the
router (``mlp.gate``, a ``models.layers.moe.Router``, which ``LayerQuantizer`` leaves alone: the routing
decisions are not worth the error).

The compute is the grouped-expert operators' (``stacked()``): on the CPU ``kernels.moe.grouped_experts``
dequantizes one expert at a time just before its matmuls (never the whole stack); on CUDA int8 stacks run
the Triton grouped GEMM (codes widened in registers), int4 stacks the same per-expert dequantizing path.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import pack_int4
from ..kernels.moe import ExpertStack
from ..models.layers.moe import StackedExperts
from .linear import quantize_int4, quantize_int8


class QuantizedExperts(nn.Module):
    """One projection of every expert, quantized. Buffers: ``weight``, ``scales`` (see the module docstring),
    ``bias`` (E, N) or None. ``group_size`` 0 means int8."""

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *,
                 in_features: int, group_size: int = 0) -> None:
        super().__init__()
        self.num_experts, self.out_features = weight.shape[:2]
        self.in_features, self.group_size = in_features, group_size
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @staticmethod
    def int4_supports(in_features: int, group_size: int) -> bool:
        """Whether int4 with ``group_size`` fits rows of ``in_features`` (the group divides them; the
        native packing takes multiples of 32 columns)."""
        return in_features % group_size == 0 and in_features % 32 == 0

    @classmethod
    def from_stacked(cls, experts: StackedExperts, device: torch.device | None = None, *,
                     group_size: int = 0) -> QuantizedExperts:
        """Quantize ``experts`` (int8, or int4 when ``group_size`` > 0) on the weight's device, then move
        the result to ``device``."""
        device = torch.device(device or experts.weight.device)
        e, n, k = experts.num_experts, experts.out_features, experts.in_features
        weight = experts.weight.detach()
        bias = None if experts.bias is None else experts.bias.detach().view(e, n).to(device)
        if group_size:
            q, sz = quantize_int4(weight, group_size)                       # (E*N, K), (K/g, E*N, 2)
            packed = pack_int4(q).view(e, n, k // 2)
            scales = sz.permute(1, 0, 2).reshape(e, n, k // group_size, 2).contiguous()
            return cls(packed.to(device), scales.to(device), bias, in_features=k, group_size=group_size)
        q8, scales8 = quantize_int8(weight, weight.dtype if weight.is_floating_point() else torch.float32)
        return cls(q8.view(e, n, k).to(device), scales8.view(e, n).to(device), bias, in_features=k)

    def stacked(self) -> ExpertStack:
        """The weights as the grouped-expert operators take them."""
        return ExpertStack(self.weight, self.bias, self.scales, self.group_size)

    def extra_repr(self) -> str:
        kind = f"int4 group_size={self.group_size}" if self.group_size else "int8"
        return (f"num_experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}, {kind}")


__all__ = ["QuantizedExperts"]
