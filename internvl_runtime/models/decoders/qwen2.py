"""Qwen2 (InternVL2-1B's Qwen2-0.5B-Instruct).

Main diff with Llama: q/k/v projections always carry a bias. Checkpoint names are the Llama ones;
q/k/v and gate/up are packed into our fused projections (see ``base.stacked_params``).
"""

from .base import DecoderForCausalLM


class Qwen2ForCausalLM(DecoderForCausalLM):
    qkv_bias = True
