"""Llama-style decoders: InternVL2-40B (Nous-Hermes-2-Yi-34B) and InternVL2-Llama3-76B (Llama-3-70B).

The base computation, unchanged; q/k/v biases only where ``attention_bias`` says so.
"""

from .base import DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    qkv_bias = False
