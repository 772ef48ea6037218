"""Normalisation layers, numerically as the reference implementations compute them."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm as in Llama/Qwen2/InternLM2/Phi-3 and InternViT-6B.

    The statistics are taken in float32 and the normalised activations are cast back to the input
    dtype *before* the weight multiply, exactly as the reference ``*RMSNorm.forward`` does (this
    matters for bfloat16 fidelity).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
