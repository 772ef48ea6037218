"""InternViT, both variants, configured by ``vision_config``.

- InternViT-300M (1B-8B): LayerNorm, q/k/v bias, no q/k norm.
- InternViT-6B (26B-76B): RMSNorm, no q/k/v bias, RMSNorm over the whole q and k vectors (all heads
  together, before the head split), 25 heads of 128.
Both: class token + learned position embedding (bicubic-resized only when the tile grid differs from
the trained one), pre-norm blocks with layer scale (ls1, ls2), GELU MLP, no final norm.
Attention is non-causal SDPA, so the 1025 x 1025 score matrix is never materialised by us.

CPU fast path for 16-bit weights (``fast_16bit``; ``benchmarks/vision.py --compare`` times it against the
plain path in one process). Float32 models, other devices, and everything after
``set_vision_fast_path(False)`` (or ``INTERNVL_VISION_FAST_PATH=0``) take the plain eager path, unchanged:

- attention: with bf16 activations on a CPU with avx512_bf16 (not the upcast plan, and unless
  ``INTERNVL_CPU_KERNEL=torch``), the native kernel ``kernels.vision_attention`` reads q/k/v straight from
  the qkv output and writes the layout ``proj`` reads: fp32 scores, exact softmax, bf16 probabilities,
  ~2x faster than torch's flash kernel at 1025 tokens x 16 heads x 64 (InternViT-300M) and ~2.5x at
  25 heads x 128 (InternViT-6B). Otherwise it runs in float32 from the 16-bit q/k/v: torch's CPU flash
  kernel (q blocks of 256, kv blocks of 512) is ~13% faster in float32 (MKL sgemm) than in bf16 (oneDNN
  gemm calls per block) on a Zen 4 with avx512_bf16, and the probabilities are never rounded to 16 bits;
- with native bf16 weights (not the upcast plan), each linear layer is one oneDNN matmul
  (``mkldnn._linear_pointwise``) with its bias and, for ``fc1`` and ``mlp1``'s first layer, the exact-erf
  GELU as post-ops, instead of addmm's bias copy + GEMM + a separate GELU pass;
- the layer-scale multiply and residual add are one ``addcmul``.
These only move bf16 rounding points (fewer roundings; tests/unit/test_vision_speed_paths.py), and the
kernel adds one: the bf16 probabilities (tests/unit/test_vision_attention.py).

Under the upcast plan (a CPU without bf16 instructions: float32 math from 16-bit weights) the fast path
keeps the activations in float32 from the patch embedding to ``mlp1``'s output (``upcast_f32``): each
linear layer widens only its weights (one conversion per call; a cached float32 copy of the encoder
measured 1-5% faster per product for +1.2 GB, benchmarks/RESULTS.md) and runs as one oneDNN float32
matmul with the bias and GELU as post-ops; norms, attention (SDPA, float32) and layer scale read float32
directly. The bf16-activation variant converted every activation to float32 and back around each product
(~150 conversions per tile); float32 activations also round less (closer to the float32 reference).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from ... import kernels
from ...config import VisionConfig
from ..decoders.base import set_shards
from ..layers.linear import Linear
from ..layers.norm import RMSNorm

_fast_path = os.environ.get("INTERNVL_VISION_FAST_PATH", "1") != "0"


def set_vision_fast_path(enabled: bool) -> None:
    """Switch the CPU 16-bit fast path of the vision encoder and ``mlp1`` on or off (benchmarks, tests)."""
    global _fast_path
    _fast_path = bool(enabled)


def vision_fast_path_enabled() -> bool:
    return _fast_path


_SIXTEEN = (torch.bfloat16, torch.float16)


def fast_16bit(x: torch.Tensor) -> bool:
    """Whether ``x`` (an activation) takes the CPU 16-bit fast path."""
    return _fast_path and x.device.type == "cpu" and x.dtype in _SIXTEEN


def upcast_f32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x`` is a float32 activation of the upcast fast path: float32 on the CPU, fast path on, and
    the layer's ``weight`` 16-bit (a float32 model never gets here with other weights: its path is plain)."""
    return _fast_path and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype in _SIXTEEN


def fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Either fast path: 16-bit activations, or float32 activations over 16-bit weights (upcast plan)."""
    return fast_16bit(x) or upcast_f32(x, weight)


def norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a LayerNorm or RMSNorm whose parameters may be 16-bit while ``x`` is float32 (the
    upcast fast path): the parameters are widened (torch's LayerNorm takes no mixed dtypes on the CPU)."""
    if isinstance(module, nn.LayerNorm) and x.dtype == torch.float32 and module.weight.dtype != x.dtype:
        bias = None if module.bias is None else module.bias.float()
        return F.layer_norm(x, module.normalized_shape, module.weight.float(), bias, module.eps)
    return module(x)


@functools.lru_cache(maxsize=2)
def _onednn_linear_op(dtype: torch.dtype = torch.bfloat16):
    """``torch.ops.mkldnn._linear_pointwise`` where this torch build has it (oneDNN) for ``dtype``
    activations (bf16: the CPU must have the instructions), else None."""
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


def _onednn_fusable(linear: nn.Module, x: torch.Tensor) -> bool:
    """bf16 activations and weights, native 16-bit plan; or float32 activations over 16-bit weights under
    the upcast plan (the weights widened per call)."""
    if not isinstance(linear, Linear) or type(linear) is not Linear:   # a quantized or parallel layer: its own
        return False
    upcast = linear.plan is not None and linear.plan.upcast
    if x.dtype == torch.bfloat16:
        dtypes_ok = linear.weight.dtype == torch.bfloat16 and not upcast and fast_16bit(x)
    else:
        dtypes_ok = upcast and upcast_f32(x, linear.weight)
    return (dtypes_ok
            and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))
            and bool(torch.backends.mkldnn.enabled) and _onednn_linear_op(x.dtype) is not None)


def fused_linear(linear: nn.Module, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """``linear(x)``, then the exact GELU if ``gelu``: one oneDNN matmul with the bias and GELU as
    post-ops where ``_onednn_fusable``, else the layer's own forward (compute plan included)."""
    if _onednn_fusable(linear, x):
        rows = x.reshape(-1, x.shape[-1])
        weight, bias = linear.weight, linear.bias
        if x.dtype == torch.float32:        # upcast: widen this layer's weights only, for this call
            weight, bias = weight.float(), None if bias is None else bias.float()
        out = _onednn_linear_op(x.dtype)(rows, weight, bias, "gelu" if gelu else "none", [],
                                         "none" if gelu else "")
        return out.view(*x.shape[:-1], out.shape[-1])
    out = linear(x)
    return F.gelu(out) if gelu else out


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    return not kernels.missing_flags("avx512bf16")


def native_attention(attn: nn.Module, qkv: torch.Tensor) -> bool:
    """Whether ``attn`` (a fast-path ``VisionAttention``) runs the native bf16 kernel on ``qkv``: bf16
    activations, not the upcast plan, no autograd, and the kernels' selected path is avx512bf16 (the CPU
    has it, the extension built, ``INTERNVL_CPU_KERNEL`` does not force another path)."""
    plan = getattr(attn.qkv, "plan", None)
    return (qkv.dtype == torch.bfloat16 and qkv.device.type == "cpu" and (plan is None or not plan.upcast)
            and not (torch.is_grad_enabled() and qkv.requires_grad) and _cpu_has_bf16()
            and kernels.selected_path() == "avx512bf16")


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

    upcast_16bit = False  # the compute plan turns it on (set_upcast_16bit) on CPUs with slow 16-bit matmuls

    def set_upcast_16bit(self, upcast: bool) -> None:
        """Compute the patch embedding in float32 from 16-bit weights (the compute plan's "upcast")."""
        self.upcast_16bit = upcast

    def forward(self, pixel_values: torch.Tensor, float32_out: bool = False) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1 + (H/14)*(W/14), dim); float32 under the upcast plan's fast path where the
        caller's layers take it (``float32_out``; the module docstring of ``intern_vit``), else the weights'
        dtype."""
        dtype = self.patch_embedding.weight.dtype
        if self.upcast_16bit and dtype != torch.float32:
            conv = self.patch_embedding
            bias = None if conv.bias is None else conv.bias.float()
            if float32_out and _fast_path and pixel_values.device.type == "cpu":
                dtype = torch.float32                                     # activations stay float32
            patches = F.conv2d(pixel_values.float(), conv.weight.float(), bias,
                               stride=conv.stride).to(dtype)              # (N, dim, h, w)
        else:
            patches = self.patch_embedding(pixel_values.to(dtype))       # (N, dim, h, w)
        n, dim, h, w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)                      # (N, h*w, dim)
        # cat([cls, patches]) + cat([pos_cls, pos_patches]), written straight into the output (same
        # additions, no concatenated intermediates)
        out = torch.empty(n, 1 + h * w, dim, dtype=dtype, device=patches.device)
        out[:, :1] = self.class_embedding.to(dtype) + self.position_embedding[:, :1, :].to(dtype)
        torch.add(patches, self._patch_positions(h, w).to(dtype), out=out[:, 1:])
        return out


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.qkv = Linear(dim, 3 * dim, bias=config.qkv_bias)
        set_shards(self.qkv, {"q": dim, "k": dim, "v": dim})   # the HF format stores q/k/v apart (hf_format.py)
        self.proj = Linear(dim, dim)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = RMSNorm(dim, eps=config.layer_norm_eps)
            self.k_norm = RMSNorm(dim, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        fast = fast_path(x, self.qkv.weight)
        qkv = fused_linear(self.qkv, x) if fast else self.qkv(x)
        native = fast and native_attention(self, qkv)                 # the bf16 kernel (module docstring)
        heads = (n, length, self.num_heads, self.head_dim)
        if self.qk_normalization:
            q, k, v = qkv.view(n, length, 3, dim).unbind(2)              # each (N, L, dim)
            q, k = norm(self.q_norm, q), norm(self.k_norm, k)            # over all heads at once
            if native:
                out = kernels.vision_attention(q.view(heads), k.view(heads), v.view(heads))  # (N, L, dim)
                return fused_linear(self.proj, out)
            if fast:
                q, k, v = q.float(), k.float(), v.float()
            q = q.view(heads).transpose(1, 2)                            # (N, heads, L, d)
            k = k.view(heads).transpose(1, 2)
            v = v.view(heads).transpose(1, 2)
        else:
            if native:                                                   # q, k, v read in place from qkv
                q, k, v = qkv.view(n, length, 3, self.num_heads, self.head_dim).unbind(2)
                return fused_linear(self.proj, kernels.vision_attention(q, k, v))  # (N, L, dim)
            if fast:
                qkv = qkv.float()          # float32 attention (module docstring); one pass, 3 x L x dim
            q, k, v = qkv.view(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)                    # (N, heads, L, d)
        out = out.transpose(1, 2).reshape(n, length, dim).to(x.dtype)
        return fused_linear(self.proj, out) if fast else self.proj(out)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_path(x, self.fc1.weight):
            return fused_linear(self.fc2, fused_linear(self.fc1, x, gelu=True))
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
        if fast_path(x, self.ls1):
            ls1, ls2 = self.ls1.to(x.dtype), self.ls2.to(x.dtype)     # float32 under the upcast plan
            x = torch.addcmul(x, self.attn(norm(self.norm1, x)), ls1)  # x + attn * ls1, rounded once
            return torch.addcmul(x, self.mlp(norm(self.norm2, x)), ls2)
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

    def set_upcast_16bit(self, upcast: bool) -> None:
        """The compute plan's 16-bit handling (see ``VisionEmbeddings.set_upcast_16bit``)."""
        self.embeddings.set_upcast_16bit(upcast)

    def _plain_linears(self) -> bool:
        """Whether every product of the encoder is our ``Linear`` (float32 activations over its 16-bit
        weights); a quantized encoder (``include_vision``) keeps 16-bit activations."""
        for layer in self.encoder.layers:
            assert isinstance(layer, VisionEncoderLayer)
            if any(type(linear) is not Linear
                   for linear in (layer.attn.qkv, layer.attn.proj, layer.mlp.fc1, layer.mlp.fc2)):
                return False
        return True

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """(N, 3, H, W) -> hidden states (N, L, dim) of ``select_layer`` as the reference indexes its
        ``hidden_states`` tuple: entry 0 is the embeddings, entry i the output of layer i, -1 the last."""
        num_layers = len(self.encoder.layers)
        stop = select_layer % (num_layers + 1)          # index into (embeddings, layer1, ..., layerN)
        x = self.embeddings(pixel_values, float32_out=self._plain_linears())
        for layer in self.encoder.layers[:stop]:
            x = layer(x)
        return x
