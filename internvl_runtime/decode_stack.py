"""The decoder layers of a decode step in one native call (``kernels.decode_layers``), where they fit it.

At batch 1 a Python layer loop costs ~15 tensor operations per layer (norms, rope, cache writes,
attention, residuals) on top of the weight streaming: ~13 ms per token for InternVL2-1B's 24 layers,
a third of the step. ``DecodeStack`` hands the whole stack to C++ instead: the same computation, rounded
to bfloat16 where the torch modules round (in a bf16 model), with the products on the GEMV kernels.

It covers the shared Llama-family layer (``models/decoders/base.py``: the InternVL2 families, and Qwen3
with its per-head q/k RMSNorm before rope) with bf16 weights, or weight-only int8 / int4 layers
(``quantization.Int8Linear``, ``Int4Linear`` on the native backend) or packed bf16 layers
(``quantization.PackedBf16Linear``), a bf16 KV pool; or a float32 model
(float32 weights, norms and KV pool: the stack computes in fp32 throughout, the products on the fp32 GEMV
kernels); head_dim a multiple of 8, all layers on the CPU. ``DecodeStack.build`` says why not otherwise,
and the model keeps its Python path (tensor-parallel layers, models split over devices, float16, quantized
layers in a float32 model, int4 on torch's kernels, experts, sinks, sliding windows). It sits beside the
compute plan, which builds it: it reads the model's layer classes, which the operators in ``kernels/``
never see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .models.decoders.base import Attention, DecoderForCausalLM, GatedMLP
from .models.layers.linear import Linear
from .quantization.linear import Int4Linear, Int8Linear
from .quantization.packed_bf16 import PackedBf16Linear

logger = logging.getLogger(__name__)


@dataclass
class _Projection:
    weights: list[torch.Tensor]
    scales: list[torch.Tensor]     # empty: bf16 / float32 weights; int8: (N,) scales; int4: (N, K/group, 2)
    biases: list[torch.Tensor]     # empty: no bias


def _projection(layers: list[nn.Module], what: str, dtype: torch.dtype) -> _Projection | str:
    """The weights of one projection over all layers, for a stack computing in ``dtype`` (bf16: bf16,
    int8 or int4 weights; float32: float32 weights only), or why they do not fit it."""
    weights, scales, biases = [], [], []
    kinds = set()
    for layer in layers:
        if type(layer) is Linear or type(layer) is nn.Linear:
            if layer.weight.dtype != dtype:
                return f"{what} weights are {layer.weight.dtype}, not {dtype}"
            kinds.add(str(dtype))
        elif dtype != torch.bfloat16:
            return f"{what} is {type(layer).__name__} in a {dtype} model"
        elif isinstance(layer, Int8Linear):
            kinds.add("int8")
            scales.append(layer.scales)
        elif isinstance(layer, Int4Linear) and layer.backend == "native":
            kinds.add("int4")
            scales.append(layer.scales_and_zeros)
        elif isinstance(layer, PackedBf16Linear):   # the blob: the native op reads its header
            kinds.add("bf16 packed")
            weights.append(layer.packed)
            if layer.bias is not None:
                biases.append(layer.bias)
            continue
        else:
            return f"{what} is {type(layer).__name__}"
        if layer.weight.device.type != "cpu":
            return f"{what} is on {layer.weight.device}"
        weights.append(layer.weight)
        if layer.bias is not None:
            biases.append(layer.bias)
    if len(kinds) != 1:
        return f"{what} mixes weight formats ({', '.join(sorted(kinds))})"
    if biases and len(biases) != len(layers):
        return f"{what} has a bias in some layers only"
    return _Projection(weights, scales, biases)


class DecodeStack:
    """Callable ``(x, cos, sin, meta, kv_cache) -> x`` over all decoder layers of ``lm`` (one token per row)."""

    def __init__(self, lm: DecoderForCausalLM, projections: dict[str, _Projection], path: str,
                 gemm_rows: int = 0) -> None:
        layers = lm.model.decoder_layers
        attn = layers[0].self_attn
        self.num_heads = attn.num_heads
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim
        self.eps = float(layers[0].input_layernorm.eps)
        self.scale = self.head_dim ** -0.5
        self.ln1: list[torch.Tensor] = [layer.input_layernorm.weight for layer in layers]
        self.ln2: list[torch.Tensor] = [layer.post_attention_layernorm.weight for layer in layers]
        # Qwen3: the per-head RMSNorm weights of queries and keys (empty: no such norms)
        self.q_norm: list[torch.Tensor] = [layer.self_attn.q_norm.weight for layer in layers
                                           if layer.self_attn.q_norm is not None]
        self.k_norm: list[torch.Tensor] = [layer.self_attn.k_norm.weight for layer in layers
                                           if layer.self_attn.k_norm is not None]
        self.projections = projections
        self.dtype = self.ln1[0].dtype   # bfloat16 or float32: activations, norms and KV pool
        self.path = path             # the ISA path, fixed when the plan is made
        self.gemm_rows = gemm_rows   # from this many rows on, bf16 products on torch's GEMM (0: never)

    @classmethod
    def build(cls, lm: DecoderForCausalLM, gemm_rows: int = 0) -> DecodeStack | str:
        """The stack for decoder ``lm``, or a sentence saying why the native path does not apply.

        ``gemm_rows``: steps of at least this many sequences run their bf16 / float32 products on torch's
        GEMM inside the native call (0: always the GEMV kernels); the compute plan chooses it per host and
        dtype. The stack computes in the dtype of the first norm weight (bfloat16 or float32)."""
        try:
            path = kernels.selected_path()
        except Exception as exc:  # noqa: BLE001 - an invalid forced path: reported, Python path kept
            return str(exc)
        if path == "torch":
            return f"no native kernel ({kernels.describe()})"
        if not kernels.has_operator("decode_layers"):
            return "the native library lacks decode_layers"
        layers = lm.model.decoder_layers
        for layer in layers:
            if type(layer.self_attn) is not Attention:
                return "the attention is not the Llama one (sinks or a sliding window)"
            if type(layer.mlp) is not GatedMLP:
                return f"the feed-forward part is {type(layer.mlp).__name__}, not a gated MLP"
        attn = layers[0].self_attn
        if attn.head_dim % 8:
            return f"head_dim {attn.head_dim} is not a multiple of 8"
        dtype = layers[0].input_layernorm.weight.dtype
        if dtype not in (torch.bfloat16, torch.float32):
            return f"weights are {dtype}"
        for layer in layers:
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            norms += [n for n in (layer.self_attn.q_norm, layer.self_attn.k_norm) if n is not None]
            if (layer.self_attn.q_norm is None) != (layers[0].self_attn.q_norm is None):
                return "q/k norms in some layers only"
            if layer.self_attn.q_norm is not None and layer.self_attn.q_norm.eps != layer.input_layernorm.eps:
                return "the q/k norms' eps differs from the layer norms'"
            for norm in norms:
                if norm.weight.dtype != dtype or norm.weight.device.type != "cpu":
                    return f"norm weights are not all {dtype} on the CPU"
        projections = {}
        for name, get in (("qkv", lambda layer: layer.self_attn.qkv_proj),
                          ("o", lambda layer: layer.self_attn.o_proj),
                          ("gate_up", lambda layer: layer.mlp.gate_up_proj),
                          ("down", lambda layer: layer.mlp.down_proj)):
            proj = _projection([get(layer) for layer in layers], name, dtype)
            if isinstance(proj, str):
                return proj
            if name != "qkv" and proj.biases:
                return f"{name} has a bias"
            projections[name] = proj
        return cls(lm, projections, path, gemm_rows)

    def applies(self, kv_cache) -> bool:
        """Whether this step's KV pools are ones the native op can write (the stack's dtype, on the CPU)."""
        key = kv_cache.keys[0]
        return key.dtype == self.dtype and key.device.type == "cpu" and kv_cache.num_groups == 1

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta, kv_cache) -> torch.Tensor:
        ctx, offsets = [], [0]
        for i, length in enumerate(meta.seq_lens):
            run = meta.context_ranges[i]
            if run is not None:
                ctx.append(torch.arange(run[0], run[0] + run[1], dtype=torch.long))
            else:
                ctx.append(meta.context_slots[i].to(torch.long))
            offsets.append(offsets[-1] + length)
        p = self.projections
        return kernels.decode_layers(
            x, self.ln1, self.ln2,
            p["qkv"].weights, p["qkv"].scales, p["qkv"].biases,
            p["o"].weights, p["o"].scales,
            p["gate_up"].weights, p["gate_up"].scales,
            p["down"].weights, p["down"].scales,
            kv_cache.keys, kv_cache.values, cos, sin,
            meta.slot_mapping, ctx[0] if len(ctx) == 1 else torch.cat(ctx), torch.tensor(offsets, dtype=torch.long),
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, eps=self.eps, scale=self.scale,
            gemm_rows=self.gemm_rows, path=self.path, q_norm=self.q_norm, k_norm=self.k_norm)
