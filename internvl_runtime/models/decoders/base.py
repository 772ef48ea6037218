"""The decoder skeleton shared by every LLM family.

Attention -> MLP -> DecoderLayer -> Model -> ForCausalLM, nano-vllm style: tokens of all sequences
in a step are flattened to (T, hidden); ``forward(embeds, positions, meta, kv_cache)`` returns hidden
states and ``compute_logits`` runs the LM head only on the rows asked for.

Module names follow the Llama/Qwen2 checkpoints (``model.layers.N.self_attn...``). Each family file
declares, as data, how its checkpoint names differ:
- ``stacked_params``: checkpoint projections packed into one of our fused parameters
  (q/k/v -> ``qkv_proj``, gate/up -> ``gate_up_proj``), with the shard each one fills;
- ``renames``: (checkpoint substring, our substring) pairs applied to every name first;
- ``expert_params``: per-expert checkpoint projections stacked into one parameter (Qwen3-MoE's
  ``mlp.experts.{e}.gate_proj``), the shard id being ``(expert, part)``;
- ``tensor_transforms``: a function applied to one of our parameter names' tensors before copying
  (InternLM2's grouped ``wqkv`` rows).

A family that departs from the Llama layer says how in ``make_attention`` / ``make_mlp`` (per layer: a
mixture of experts in some layers only, sliding-window layers) or with ``qk_norm`` (Qwen3's per-head
RMSNorm on queries and keys before the rotary embedding).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import ClassVar, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from ...config import LLMConfig
from ..layers.attention import AttentionMetadata, KVCache, paged_attention
from ..layers.linear import Linear
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding, apply_rotary


def set_shards(module: nn.Linear, shards: dict[object, int]) -> None:
    """Record the output-row ranges of a fused projection (its weight and bias alike):
    shard id -> (offset, size) along dim 0. The loader reads ``module.shard_offsets``."""
    offsets, start = {}, 0
    for shard_id, size in shards.items():
        offsets[shard_id] = (start, size)
        start += size
    assert start == module.out_features, (start, module.out_features)
    module.shard_offsets = offsets  # type: ignore[assignment]


class Attention(nn.Module):
    #: The positions each query sees: the last ``window`` ones (itself included), or None: every earlier one.
    window: int | None = None
    # Our Linear, until quantization or tensor parallelism swaps in its own layer (not always an nn.Linear).
    qkv_proj: nn.Module
    o_proj: nn.Module

    def __init__(self, config: LLMConfig, qkv_bias: bool, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        set_shards(qkv_proj, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size})
        self.qkv_proj = qkv_proj
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=False)
        # Qwen3: RMSNorm over each head's vector of q and k (weights of head_dim), before the rotary embedding.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> q (T, H, D), k and v (T, KV, D), rotated."""
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = q.view(T, self.num_heads, self.head_dim), k.view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v.view(T, self.num_kv_heads, self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.project_qkv(x, cos, sin)
        out = paged_attention(q, k, v, key_cache=key_cache, value_cache=value_cache, meta=meta)
        return self.o_proj(out.reshape(T, self.q_size))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    # Our Linear, until quantization or tensor parallelism swaps in its own layer (not always an nn.Linear).
    gate_up_proj: nn.Module
    down_proj: nn.Module

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        set_shards(gate_up_proj, {0: config.intermediate_size, 1: config.intermediate_size})
        self.gate_up_proj = gate_up_proj
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)); the family makes the two parts."""

    self_attn: Attention
    mlp: nn.Module

    def __init__(self, config: LLMConfig, self_attn: Attention, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                key_cache: torch.Tensor, value_cache: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta, key_cache, value_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config: LLMConfig, make_layer: Callable[[int], DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        """``layers``, typed (to a type checker the items of an ``nn.ModuleList`` are plain Modules)."""
        return cast("list[DecoderLayer]", list(self.layers))


class DecodeStackRunner(Protocol):
    """What runs every decoder layer of a decode step at once (``decode_stack.DecodeStack``, a layer above)."""

    def applies(self, kv_cache: KVCache) -> bool: ...

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                 kv_cache: KVCache) -> torch.Tensor: ...


class DecoderForCausalLM(nn.Module):
    """Base of every family. Subclasses set the class attributes below and nothing else, unless the
    family departs from the Llama computation (say so in a comment there)."""

    qkv_bias: ClassVar[bool] = False
    qk_norm: ClassVar[bool] = False
    # The tables are class-level data shared by every instance: tuples and read-only mappings, never mutated.
    stacked_params: ClassVar[tuple[tuple[str, str, object], ...]] = (
        # (our name piece, checkpoint name piece, shard id)
        ("self_attn.qkv_proj", "self_attn.q_proj", "q"),
        ("self_attn.qkv_proj", "self_attn.k_proj", "k"),
        ("self_attn.qkv_proj", "self_attn.v_proj", "v"),
        ("mlp.gate_up_proj", "mlp.gate_proj", 0),
        ("mlp.gate_up_proj", "mlp.up_proj", 1),
    )
    renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: Per-expert checkpoint projections packed into ``layers.moe.StackedExperts``: (our name piece, checkpoint
    #: name piece with ``{e}`` for the expert index, part); the shard id is ``(expert, part)``.
    expert_params: ClassVar[tuple[tuple[str, str, int], ...]] = ()
    tensor_transforms: ClassVar[Mapping[str, Callable[[LLMConfig, torch.Tensor], torch.Tensor]]] = MappingProxyType({})
    #: Given by the compute plan (set_decode_stack) where a native kernel runs the whole layer stack of a decode step
    #: (``decode_stack.DecodeStack``) for steps of at most ``decode_stack_rows`` sequences.
    decode_stack: DecodeStackRunner | None = None
    decode_stack_rows: int = 0
    # Our Linear, until quantization or tensor parallelism swaps in its own layer (not always an nn.Linear).
    lm_head: nn.Module
    #: Each decoder layer's device when the model is spread over several (``placement.dispatch_model``).
    layer_devices: list[torch.device] | None = None

    def __init__(self, config: LLMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, lambda i: DecoderLayer(config, self.make_attention(config, i),
                                                                 self.make_mlp(config, i)))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)

    def make_attention(self, config: LLMConfig, layer_index: int) -> Attention:
        """Layer ``layer_index``'s attention (the Llama one unless the family says otherwise)."""
        return Attention(config, self.qkv_bias or config.attention_bias, qk_norm=self.qk_norm)

    def make_mlp(self, config: LLMConfig, layer_index: int) -> nn.Module:
        """Layer ``layer_index``'s feed-forward part (a gated MLP unless the family says otherwise)."""
        return GatedMLP(config)

    def attention_windows(self) -> list[int | None]:
        """Each decoder layer's attention window (None: full attention), for the KV cache's layer groups."""
        return [layer.self_attn.window for layer in self.model.decoder_layers]

    def set_decode_stack(self, stack: DecodeStackRunner | None, max_rows: int = 0) -> None:
        """Run decode steps of at most ``max_rows`` sequences through ``stack`` (None: the Python layers)."""
        self.decode_stack, self.decode_stack_rows = stack, (max_rows if stack is not None else 0)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: KVCache) -> torch.Tensor:
        """embeds: (T, hidden), positions: (T,) -> final hidden states (T, hidden), normed."""
        rows, extra = meta.rope_rows, meta.rope_extra_bases
        if rows is None:    # a caller that did not plan the rope rows on the host (not the model runner)
            rows, extra = self.rotary.rows_from_positions(positions, meta.query_lens, meta.seq_lens)
        cos, sin = self.rotary.cos_sin(positions, rows, embeds.dtype, extra)
        stack = self.decode_stack
        if (stack is not None and meta.attention_backend == "torch" and meta.is_decode
                and embeds.shape[0] <= self.decode_stack_rows and embeds.dtype in (torch.bfloat16, torch.float32)
                and stack.applies(kv_cache)):
            return self.model.norm(stack(embeds, cos, sin, meta, kv_cache))
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, meta.for_group(kv_cache.group_of(i)), kv_cache.keys[i], kv_cache.values[i])
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) float32, as the reference upcasts its logits."""
        return self.lm_head(hidden).float()
