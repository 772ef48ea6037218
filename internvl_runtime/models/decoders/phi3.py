"""Phi-3 (InternVL2-4B's Phi-3-mini-128k-instruct).

Main diff with Llama: the checkpoint already stores q/k/v fused (``qkv_proj``, rows [q; k; v]) and
gate/up fused (``gate_up_proj``, rows [gate; up]), in exactly our layout, so nothing is stacked; and
its rope is the "su" long-context scaling (``layers/rotary.py``).
"""

from .base import DecoderForCausalLM


class Phi3ForCausalLM(DecoderForCausalLM):
    qkv_bias = False
    stacked_params = ()
