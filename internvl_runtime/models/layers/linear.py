"""``Linear``: an ``nn.Linear`` (same parameters and names) whose forward follows the host's compute plan.

Without a plan it is exactly ``F.linear``. With one (``set_compute_plan``) it can:
- run small-row products (decode) through a CPU GEMV kernel that streams the stored weights (bf16, or
  float32 in a float32 model);
- upcast: compute in float32 from 16-bit weights, one layer at a time, on CPUs whose 16-bit matrix
  products are slow (no avx512_bf16/AMX: ~160x slower than float32 on an AMD Zen 3). Weights stay at
  2 bytes; only the layer being computed is widened, so peak memory stays near the 16-bit size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SmallRowKernel = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class LinearPlan:
    """How one kind of layer computes: ``upcast`` 16-bit products to float32; ``small_row_kernel`` for
    inputs of at most ``max_kernel_rows`` rows (decode)."""

    upcast: bool = False
    small_row_kernel: SmallRowKernel | None = None
    max_kernel_rows: int = 16


class Linear(nn.Linear):
    plan: LinearPlan | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan is None or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1]
        if plan.small_row_kernel is not None and rows <= plan.max_kernel_rows and x.dtype == self.weight.dtype:
            # the kernel of the model's dtype (bf16 or float32); one for another dtype hands over to F.linear
            out = plan.small_row_kernel(x.reshape(rows, x.shape[-1]), self.weight, self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        if plan.upcast and self.weight.dtype != torch.float32:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def set_linear_plan(module: nn.Module, plan: LinearPlan | None) -> int:
    """Give every ``Linear`` under ``module`` the plan; returns how many were set."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, Linear):
            sub.plan = plan
            count += 1
    return count
