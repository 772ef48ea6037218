"""InternViT, both variants, configured by ``vision_config``.

- InternViT-300M (1B-8B): LayerNorm, q/k/v bias, no q/k norm.
- InternViT-6B (26B-76B): RMSNorm, no q/k/v bias, RMSNorm over the whole q and k vectors (all heads
  together, before the head split), 25 heads of 128.
Both: class token + learned position embedding (bicubic-resized only when the tile grid differs from
the trained one), pre-norm blocks with layer scale (ls1, ls2), GELU MLP, no final norm.
Attention is non-causal SDPA, so the 1025 x 1025 score matrix is never materialised by us.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import VisionConfig
from ..layers.linear import Linear
from ..layers.norm import RMSNorm


def make_norm(config: VisionConfig, size: int) -> nn.Module:
    if config.norm_type == "layer_norm":
        return nn.LayerNorm(size, eps=config.layer_norm_eps)
    return RMSNorm(size, eps=config.layer_norm_eps)


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.grid = config.image_size // config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, dim))

    def _patch_positions(self, height: int, width: int) -> torch.Tensor:
        pos = self.position_embedding[:, 1:, :]
        if (height, width) == (self.grid, self.grid):
            # The reference interpolates even at the native size; bicubic at scale 1 is the identity.
            return pos
        dtype = pos.dtype
        grid = pos.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, height * width).permute(0, 2, 1).to(dtype)

    upcast_16bit = False  # set by the compute plan on CPUs with slow 16-bit matmuls

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1 + (H/14)*(W/14), dim)."""
        dtype = self.patch_embedding.weight.dtype
        if self.upcast_16bit and dtype != torch.float32:
            conv = self.patch_embedding
            patches = F.conv2d(pixel_values.float(), conv.weight.float(), conv.bias.float(),
                               stride=conv.stride).to(dtype)              # (N, dim, h, w)
        else:
            patches = self.patch_embedding(pixel_values.to(dtype))       # (N, dim, h, w)
        n, _, h, w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)                      # (N, h*w, dim)
        cls = self.class_embedding.expand(n, 1, -1).to(dtype)
        pos = torch.cat([self.position_embedding[:, :1, :], self._patch_positions(h, w)], dim=1)
        return torch.cat([cls, patches], dim=1) + pos.to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = Linear(dim, 3 * dim, bias=config.qkv_bias)
        self.proj = Linear(dim, dim)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = RMSNorm(dim, eps=config.layer_norm_eps)
            self.k_norm = RMSNorm(dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, dim).unbind(2)          # each (N, L, dim)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)                        # over all heads at once
        q = q.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)  # (N, heads, L, d)
        k = k.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config, config.hidden_size)
        self.attn = VisionAttention(config)
        self.ls1 = nn.Parameter(torch.ones(config.hidden_size))
        self.norm2 = make_norm(config, config.hidden_size)
        self.mlp = VisionMLP(config)
        self.ls2 = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))


class InternVisionModel(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """(N, 3, H, W) -> hidden states (N, L, dim) of ``select_layer`` as the reference indexes its
        ``hidden_states`` tuple: entry 0 is the embeddings, entry i the output of layer i, -1 the last."""
        num_layers = len(self.encoder.layers)
        stop = select_layer % (num_layers + 1)          # index into (embeddings, layer1, ..., layerN)
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[:stop]:
            x = layer(x)
        return x
