"""Qwen3-MoE (InternVL3.5-30B-A3B, 241B-A28B).

Main diff with Qwen3: the feed-forward part of the sparse layers (``moe.is_sparse``: every
``decoder_sparse_step``-th layer not in ``mlp_only_layers``) is a mixture of experts: router ``mlp.gate``
(no bias), softmax over all experts in float32, top-k renormalised when ``norm_topk_prob``; each expert a
gated SiLU MLP of ``moe_intermediate_size`` stored per expert (``mlp.experts.{e}.{gate,up,down}_proj``),
stacked at load into ``layers.moe.StackedExperts``.
"""

from __future__ import annotations

from torch import nn

from ...config import LLMConfig
from ..layers.moe import SparseMoE
from .base import DecoderForCausalLM, GatedMLP


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    qkv_bias = False
    qk_norm = True
    expert_params = (
        ("mlp.experts.gate_up_proj", "mlp.experts.{e}.gate_proj", 0),
        ("mlp.experts.gate_up_proj", "mlp.experts.{e}.up_proj", 1),
        ("mlp.experts.down_proj", "mlp.experts.{e}.down_proj", 0),
    )

    def make_mlp(self, config: LLMConfig, layer_index: int) -> nn.Module:
        if config.moe is not None and config.moe.is_sparse(layer_index):
            return SparseMoE(config, routing="softmax_topk")
        return GatedMLP(config)
