"""Pixel shuffle and the ``mlp1`` projector: ViT tokens -> LLM embeddings (256 per 448 tile)."""

from __future__ import annotations

import torch
from torch import nn

from .layers.linear import Linear
from .vision.intern_vit import fast_path, fused_linear
from .vision.intern_vit import norm as norm_f32


def pixel_shuffle(x: torch.Tensor, scale: float, ps_version: str) -> torch.Tensor:
    """(N, W, H, C) -> (N, H*s, W*s, C/s^2) for s = scale (0.5): folds 2x2 neighbours into channels.

    Reproduces the reference reshape order; ``ps_version == 'v1'`` skips the final swap back of the
    two spatial axes (the transposed layout the v1 checkpoints were trained with).
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))                  # (N, W, H*s, C/s)
    x = x.permute(0, 2, 1, 3)                                            # (N, H*s, W, C/s)
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3)
    return x


class Projector(nn.Sequential):
    """``mlp1``: LayerNorm -> Linear -> GELU -> Linear; indices 0, 1, 3 match the checkpoint names."""

    def __init__(self, vit_hidden: int, llm_hidden: int, downsample_ratio: float) -> None:
        width = vit_hidden * round(1 / downsample_ratio) ** 2
        super().__init__(nn.LayerNorm(width), Linear(width, llm_hidden), nn.GELU(),
                         Linear(llm_hidden, llm_hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm, fc1, gelu, fc2 = self
        if (isinstance(fc1, Linear) and fast_path(x, fc1.weight) and isinstance(gelu, nn.GELU)
                and gelu.approximate == "none"):
            # bias and exact GELU fused into the matmuls where oneDNN can (see intern_vit.fused_linear);
            # float32 ``x`` over 16-bit weights (the upcast plan) stays float32 here too
            return fused_linear(fc2, fused_linear(fc1, norm_f32(norm, x), gelu=True))
        if isinstance(norm, nn.LayerNorm) and norm.weight.dtype != x.dtype:
            x = x.to(norm.weight.dtype)        # float32 features from an upcast encoder, a quantized mlp1
        return super().forward(x)
