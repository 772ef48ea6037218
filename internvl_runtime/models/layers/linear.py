"""``Linear``: an ``nn.Linear`` (same parameters and names) whose forward follows the host's compute plan.

Without a plan it is exactly ``F.linear``. With one (``set_compute_plan``) it can:
- run small-row products (decode) through a CPU GEMV kernel that streams the stored weights (bf16, or
  float32 in a float32 model);
- upcast: compute in float32 from 16-bit weights, one layer at a time, on CPUs whose 16-bit matrix
  products are slow (no avx512_bf16/AMX: ~160x slower than float32 on an AMD Zen 3). Weights stay at
  2 bytes; only the layer being computed is widened, ``UPCAST_CHUNK_BYTES`` of it at a time (its output
  rows written straight into the 16-bit result), so peak memory stays near the 16-bit size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: float32 weights one upcast product widens at once: InternVL2-1B's gate_up whole was 35 MB of weights plus a
#: float32 output (77 MB at a 7-tile prompt's 1968 tokens), the peak of an upcast-plan process (RESULTS.md).
UPCAST_CHUNK_BYTES = 8 << 20

SmallRowKernel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class LinearPlan:
    """How one kind of layer computes: ``upcast`` 16-bit products to float32; ``small_row_kernel`` for
    inputs of at most ``max_kernel_rows`` rows (decode)."""

    upcast: bool = False
    small_row_kernel: SmallRowKernel | None = None
    max_kernel_rows: int = 16


def planned_linear(plan: LinearPlan | None, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as ``plan`` computes it (``Linear.forward``, and the experts of
    ``layers.moe.SparseMoE``, whose stacked weights are one (out, in) matrix per expert)."""
    if plan is None or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if plan.small_row_kernel is not None and rows <= plan.max_kernel_rows and x.dtype == weight.dtype:
        # the kernel of the model's dtype (bf16 or float32); one for another dtype hands over to F.linear
        out = plan.small_row_kernel(x.reshape(rows, x.shape[-1]), weight, bias)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if plan.upcast and weight.dtype != torch.float32:
        return upcast_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` in float32 from 16-bit ``x`` / ``weight`` / ``bias``, rounded once to ``x.dtype``: the
    weight's output rows widened ``UPCAST_CHUNK_BYTES`` at a time, each chunk's float32 product rounded into its
    columns of the result (what one whole-matrix product rounds them to)."""
    x32 = x.float()
    out_features, in_features = weight.shape
    step = max(1, UPCAST_CHUNK_BYTES // (4 * max(1, in_features)))
    if out_features <= step:
        return F.linear(x32, weight.float(), None if bias is None else bias.float()).to(x.dtype)
    out = x.new_empty(*x.shape[:-1], out_features)
    for start in range(0, out_features, step):
        stop = min(out_features, start + step)
        out[..., start:stop] = F.linear(x32, weight[start:stop].float(),
                                        None if bias is None else bias[start:stop].float())
    return out


class Linear(nn.Linear):
    plan: LinearPlan | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return planned_linear(self.plan, x, self.weight, self.bias)


def set_linear_plan(module: nn.Module, plan: LinearPlan | None) -> int:
    """Give every ``Linear`` under ``module`` the plan; returns how many were set."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, Linear):
            sub.plan = plan
            count += 1
    return count
