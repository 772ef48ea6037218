"""InternLM2 / InternLM2.5 (InternVL2-2B, 8B, 26B).

Main diff with Llama: the computation is Llama's (dynamic-NTK rope where configured); only the
checkpoint layout differs, declared below:
- module names: tok_embeddings, attention.{wqkv,wo}, feed_forward.{w1,w2,w3}, attention_norm,
  ffn_norm, output;
- ``wqkv`` packs q/k/v *grouped by KV head*: rows are (kv_heads, q_per_kv + 2, head_dim), each group
  holding its q heads, then its k head, then its v head. We regroup the rows to [q; k; v] at load.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from ...config import LLMConfig
from .base import DecoderForCausalLM


def ungroup_wqkv(config: LLMConfig, weight: torch.Tensor) -> torch.Tensor:
    """(kv * (g + 2) * d, hidden) grouped rows -> ([q; k; v], hidden) rows."""
    kv, d = config.num_key_value_heads, config.head_dim
    g = config.num_attention_heads // kv
    w = weight.reshape(kv, g + 2, d, weight.shape[-1])
    q = w[:, :g].reshape(kv * g * d, -1)   # query head index = kv_head * g + j, as the reference
    k = w[:, g].reshape(kv * d, -1)
    v = w[:, g + 1].reshape(kv * d, -1)
    return torch.cat([q, k, v], dim=0)


class InternLM2ForCausalLM(DecoderForCausalLM):
    qkv_bias = False
    stacked_params = (
        ("mlp.gate_up_proj", "mlp.w1", 0),
        ("mlp.gate_up_proj", "mlp.w3", 1),
    )
    renames = (
        ("model.tok_embeddings.", "model.embed_tokens."),
        (".attention.wqkv.", ".self_attn.qkv_proj."),
        (".attention.wo.", ".self_attn.o_proj."),
        (".feed_forward.w2.", ".mlp.down_proj."),
        (".feed_forward.", ".mlp."),
        (".attention_norm.", ".input_layernorm."),
        (".ffn_norm.", ".post_attention_layernorm."),
        ("language_model.output.", "language_model.lm_head."),
    )
    tensor_transforms = MappingProxyType({"self_attn.qkv_proj.weight": ungroup_wqkv})
