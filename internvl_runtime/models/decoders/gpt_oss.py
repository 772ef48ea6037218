"""GPT-OSS (InternVL3.5-GPT-OSS-20B-A4B), as transformers 4.55's ``GptOssForCausalLM`` computes it.

Main diff with Llama:
- attention: q/k/v *and o* biases; one learned logit per head (``self_attn.sinks``) joins every softmax
  row as an extra column that takes weight but gives no value; layers whose ``layer_types`` entry is
  "sliding_attention" see only the last ``sliding_window`` positions (the token itself included), the
  others every earlier position (``layers.attention.paged_sink_attention``: per sequence on the torch
  backend; in the paged kernel, ``kernels.triton_attention``, on the triton backend);
- rotary: YaRN (``layers.rotary``), the rotation of the two halves as Llama's;
- feed-forward: every layer is a mixture of experts: router ``mlp.router`` with a bias, top-k of its
  logits then a softmax over those k; experts with biases and the clamped SwiGLU
  ((up + 1) * gate * sigmoid(1.702 gate), gate clamped above and up to +-``swiglu_limit``).

Checkpoint layout, declared below as data: the router is renamed to our ``mlp.gate``; the experts come
stacked as parameters, not per-expert Linears: ``mlp.experts.gate_up_proj`` (E, hidden, 2I) with gate and
up *interleaved* by column (gate = [..., ::2], up = [..., 1::2]), ``gate_up_proj_bias`` (E, 2I),
``down_proj`` (E, I, hidden), ``down_proj_bias`` (E, hidden); the transforms turn them into our
``StackedExperts`` convention (nn.Linear's (out, in) per expert, gate rows then up rows).

Known difference: the reference keeps its RMSNorm weights in float32 and multiplies before casting back;
ours casts first, as Llama's (equal in float32, one rounding apart in bfloat16).
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import nn

from ...config import LLMConfig
from ..layers.attention import AttentionMetadata, paged_sink_attention
from ..layers.linear import Linear
from ..layers.moe import SparseMoE
from .base import Attention, DecoderForCausalLM

SLIDING = "sliding_attention"


class SinkAttention(Attention):
    """Llama attention with an o_proj bias, per-head sinks and this layer's window (None: full)."""

    def __init__(self, config: LLMConfig, layer_index: int) -> None:
        super().__init__(config, qkv_bias=True)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=True)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads))
        types = config.layer_types
        self.window = config.sliding_window if types is not None and types[layer_index] == SLIDING else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.project_qkv(x, cos, sin)
        out = paged_sink_attention(q, k, v, key_cache=key_cache, value_cache=value_cache, meta=meta,
                                   sinks=self.sinks, window=self.window)
        return self.o_proj(out.reshape(T, self.q_size))


def gate_up_weight(config: LLMConfig, weight: torch.Tensor) -> torch.Tensor:
    """(E, hidden, 2I) interleaved gate/up columns -> (E * 2I, hidden): per expert its gate rows, then up rows."""
    stacked = torch.cat([weight[..., ::2], weight[..., 1::2]], dim=-1)        # (E, hidden, 2I)
    return stacked.transpose(1, 2).reshape(-1, weight.shape[1]).contiguous()


def gate_up_bias(config: LLMConfig, bias: torch.Tensor) -> torch.Tensor:
    """(E, 2I) interleaved -> (E * 2I,) gate then up per expert."""
    return torch.cat([bias[..., ::2], bias[..., 1::2]], dim=-1).reshape(-1).contiguous()


def down_weight(config: LLMConfig, weight: torch.Tensor) -> torch.Tensor:
    """(E, I, hidden) -> (E * hidden, I)."""
    return weight.transpose(1, 2).reshape(-1, weight.shape[1]).contiguous()


def flat_bias(config: LLMConfig, bias: torch.Tensor) -> torch.Tensor:
    """(E, hidden) -> (E * hidden,)."""
    return bias.reshape(-1).contiguous()


class GptOssForCausalLM(DecoderForCausalLM):
    qkv_bias = True
    renames = (
        (".mlp.router.", ".mlp.gate."),
        # The stacked experts are parameters (no ".weight"); their biases' names extend the weights'
        # ("gate_up_proj_bias"), so the weight rename runs first and the bias names are mended after it.
        (".mlp.experts.gate_up_proj", ".mlp.experts.gate_up_proj.weight"),
        (".mlp.experts.down_proj", ".mlp.experts.down_proj.weight"),
        ("_proj.weight_bias", "_proj.bias"),
    )
    tensor_transforms = MappingProxyType({
        "mlp.experts.gate_up_proj.weight": gate_up_weight,
        "mlp.experts.gate_up_proj.bias": gate_up_bias,
        "mlp.experts.down_proj.weight": down_weight,
        "mlp.experts.down_proj.bias": flat_bias,
    })

    def make_attention(self, config: LLMConfig, layer_index: int) -> Attention:
        return SinkAttention(config, layer_index)

    def make_mlp(self, config: LLMConfig, layer_index: int) -> nn.Module:
        # transformers 4.55's GptOssExperts fixes limit 7.0 and alpha 1.702 (the config's swiglu_limit is 7.0
        # in the release but the reference does not read it): so do we.
        return SparseMoE(config, routing="topk_softmax", activation="gpt_oss", router_bias=True, expert_bias=True,
                         limit=7.0, alpha=1.702)
