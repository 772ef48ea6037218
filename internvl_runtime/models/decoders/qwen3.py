"""Qwen3 dense (InternVL3.5-1B ... 38B).

Main diff with Qwen2: no q/k/v bias, and an RMSNorm over each head's query and key vectors (``q_norm``,
``k_norm``: ``head_dim`` weights, applied before the rotary embedding); ``head_dim`` is stated by the config
(heads x head_dim need not be hidden_size). Checkpoint names are Llama's plus ``self_attn.{q,k}_norm``.
"""

from .base import DecoderForCausalLM


class Qwen3ForCausalLM(DecoderForCausalLM):
    qkv_bias = False
    qk_norm = True
