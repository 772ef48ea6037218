"""Tensor-parallel decoders: which layer is split how, declared as data, and the per-rank slice reads.

Megatron's split, per decoder layer (every family shares ``models/decoders/base.py``'s skeleton):

========================  =================  ======================================================
our parameter             split              what a rank holds
========================  =================  ======================================================
self_attn.qkv_proj        column (rows)      its query heads; its KV heads (replicated: the one its
                                             query heads use, when there are fewer KV heads than ranks)
self_attn.o_proj          row (columns)      the columns of its query heads; all-reduce after, then
                                             the bias (GPT-OSS's) added once
self_attn.sinks           by head            GPT-OSS's one logit per query head: its heads' entries
mlp.gate_up_proj          column (rows)      intermediate/N rows of gate and of up
mlp.down_proj             row (columns)      the same intermediate/N columns; all-reduce after
model.embed_tokens        vocabulary rows    vocab padded to a multiple of N, then /N; masked lookup
                                             + all-reduce
lm_head                   vocabulary rows    the same rows; all-gather, padded entries cut off
norms, rotary             replicated
mlp.gate (MoE router)     replicated         the whole router: every rank routes every token
mlp.experts.*             by expert          experts [rank * E/N, (rank + 1) * E/N), whole (biases too);
                                             all-reduce after (each rank adds its experts' share)
========================  =================  ======================================================

Two all-reduces per layer (after o_proj and down_proj, or after the experts) plus one for the embedding;
one all-gather of the logits. Row-parallel biases (GPT-OSS's o_proj) are added once, after the sum.

GPT-OSS's attention (``SinkAttention``) splits as Llama's: each rank keeps its query heads' sinks (a sink
joins the softmax of its own head only) and every layer's window; the attention math is per head, so the
ranks' heads together compute exactly the whole. Its experts come stacked in the checkpoint (one
(E, ...) tensor per projection, turned into our layout by a whole-tensor transform): every such transform
acts expert by expert along the first dimension (``EXPERT_WISE_TRANSFORMS``), so a rank reads rows
[first, first + count) of the checkpoint tensor from the memory map (its experts only) and applies the
family's transform to that slice: the result is exactly its rows of the transformed whole.

Mixture-of-experts layers (``models.layers.moe.SparseMoE``, Qwen3-MoE) use expert parallelism on the same
ranks instead of splitting each expert's width: a Qwen3-30B-A3B expert is only 768 wide, so a split would
leave each rank a sliver of every expert (many tiny matmuls), while whole experts keep each rank's grouped
GEMM as it is, over fewer experts. The router is replicated (it is small) so every rank picks the same
experts for every token; each rank reads only its own experts' checkpoint tensors (the others resolve to
``weights.loader.ELSEWHERE``). The layers without experts of such a model (``mlp_only_layers``) split as
above. The load per rank follows the routing: balanced on average, not per step.

The vision encoder and ``mlp1`` are **not split: rank 0 alone holds and runs them** and sends the image
features with the step (workers keep them on the meta device and never read their weights). Why:
InternViT-6B has 25 heads, which no rank count divides (splitting needs zero-padded dummy heads and a
q/k RMSNorm over the whole 3200-wide vector, i.e. an extra all-reduce per layer); the encoder runs once
per image, not once per token, and the engine's feature cache already skips repeated images, so its
share of the compute is small. Replicating it on every rank would cost each worker 0.6 GB (300M) or
11 GB (6B) for no speed-up; on rank 0 it is one copy.

Each rank reads only its own rows/columns from the memory-mapped safetensors (``LazyTensor`` slices,
``weights/loader.py``): no rank ever materialises a whole split tensor. Fused checkpoint tensors are
sliced per part: Phi-3's ``qkv_proj`` / ``gate_up_proj`` by their q/k/v and gate/up row ranges, and
InternLM2's ``wqkv`` by whole KV groups (its rows are grouped per KV head, see ``internlm2.py``), then
regrouped to [q; k; v] locally.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import InternVLConfig, LLMConfig
from ..errors import ConfigError, UnsupportedFeature
from ..models.decoders.base import Attention, DecoderForCausalLM, GatedMLP, set_shards
from ..models.decoders.gpt_oss import SinkAttention, down_weight, flat_bias, gate_up_bias, gate_up_weight
from ..models.decoders.internlm2 import ungroup_wqkv
from ..models.layers.moe import SparseMoE
from ..weights.loader import ELSEWHERE, LazyTensor, LazyTransform, Resolver, Transform
from .parallel_state import TPGroup

# ---------------------------------------------------------------------------------------------------
# Sizes: what each rank holds
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPlan:
    """Global and per-rank sizes of one decoder split ``tp`` ways; ``rank`` is this process's."""

    tp: int
    rank: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_experts: int = 0                  # 0: no mixture-of-experts layers

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.tp

    @property
    def expert_start(self) -> int:
        return self.rank * self.experts_per_rank

    def expert_range(self) -> tuple[int, int]:
        """(first global expert id, count) of this rank's experts."""
        return self.expert_start, self.experts_per_rank

    @property
    def heads_per_rank(self) -> int:
        return self.num_heads // self.tp

    @property
    def kv_replicated(self) -> bool:
        """Fewer KV heads than ranks: each rank keeps the one KV head its query heads use."""
        return self.num_kv_heads < self.tp

    @property
    def kv_heads_per_rank(self) -> int:
        return 1 if self.kv_replicated else self.num_kv_heads // self.tp

    @property
    def kv_head_start(self) -> int:
        if self.kv_replicated:
            return self.rank // (self.tp // self.num_kv_heads)
        return self.rank * self.kv_heads_per_rank

    @property
    def intermediate_per_rank(self) -> int:
        return self.intermediate_size // self.tp

    @property
    def vocab_padded(self) -> int:
        return math.ceil(self.vocab_size / self.tp) * self.tp

    @property
    def vocab_per_rank(self) -> int:
        return self.vocab_padded // self.tp

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    # Row ranges (global size, start, length) of each split dimension, in checkpoint rows.
    def heads(self) -> tuple[int, int, int]:
        d = self.head_dim
        return self.num_heads * d, self.rank * self.heads_per_rank * d, self.heads_per_rank * d

    def kv_heads(self) -> tuple[int, int, int]:
        d = self.head_dim
        return self.num_kv_heads * d, self.kv_head_start * d, self.kv_heads_per_rank * d

    def head_ids(self) -> tuple[int, int, int]:
        """Query heads themselves (one entry each: GPT-OSS's sinks), not their rows."""
        return self.num_heads, self.rank * self.heads_per_rank, self.heads_per_rank

    def intermediate(self) -> tuple[int, int, int]:
        n = self.intermediate_per_rank
        return self.intermediate_size, self.rank * n, n

    def vocab(self) -> tuple[int, int, int]:
        return self.vocab_size, self.vocab_start, self.vocab_per_rank


def check_tensor_parallel(config: InternVLConfig | LLMConfig, tp: int) -> None:
    """``ConfigError`` (before any weight is read) when ``tp`` cannot split this model's decoder."""
    llm = config.llm if isinstance(config, InternVLConfig) else config
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
    if tp == 1:
        return
    heads, kv = llm.num_attention_heads, llm.num_key_value_heads
    if heads % tp:
        sizes = [n for n in range(1, heads + 1) if heads % n == 0]
        raise ConfigError(f"tensor_parallel_size {tp} does not divide the {heads} attention heads of "
                          f"{llm.architecture}; sizes that do: {', '.join(map(str, sizes))}")
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ConfigError(f"tensor_parallel_size {tp} and the {kv} KV heads: the size must divide them, or "
                          "be a multiple of them (KV heads are then replicated)")
    moe = llm.moe
    dense_layers = [i for i in range(llm.num_hidden_layers) if moe is None or not moe.is_sparse(i)]
    if dense_layers and llm.intermediate_size % tp:
        raise ConfigError(f"tensor_parallel_size {tp} does not divide intermediate_size {llm.intermediate_size}")
    if moe is not None and moe.num_experts % tp:
        raise ConfigError(f"tensor_parallel_size {tp} does not divide the {moe.num_experts} experts of "
                          f"{llm.architecture} (each rank holds num_experts / tensor_parallel_size whole experts)")


def shard_plan(llm: LLMConfig, tp: int, rank: int) -> ShardPlan:
    check_tensor_parallel(llm, tp)
    return ShardPlan(tp=tp, rank=rank, num_heads=llm.num_attention_heads, num_kv_heads=llm.num_key_value_heads,
                     head_dim=llm.head_dim, intermediate_size=llm.intermediate_size, vocab_size=llm.vocab_size,
                     num_experts=llm.moe.num_experts if llm.moe is not None else 0)


# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------


class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_local @ W_local^T) + b: this rank holds ``in_features`` of the input columns."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: TPGroup) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tp_group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp_group.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class ExpertParallelMoE(SparseMoE):
    """A ``SparseMoE`` holding this rank's experts only: routes every token over all experts, computes its
    experts' share, and sums the shares of all ranks (one all-reduce)."""

    def __init__(self, config: LLMConfig, group: TPGroup, expert_range: tuple[int, int], **settings: Any) -> None:
        super().__init__(config, expert_range=expert_range, **settings)
        self.tp_group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp_group.all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, start + n) of the (padded) vocabulary; other ids give zeros, summed over ranks."""

    def __init__(self, num_local: int, dim: int, start: int, group: TPGroup) -> None:
        super().__init__(num_local, dim)
        self.vocab_start, self.tp_group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)      # (T, hidden)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self.tp_group.all_reduce(out)


class VocabParallelLMHead(nn.Linear):
    """Logits of this rank's vocabulary rows, all-gathered; the padding past ``vocab_size`` is cut off."""

    def __init__(self, dim: int, num_local: int, vocab_size: int, group: TPGroup) -> None:
        super().__init__(dim, num_local, bias=False)
        self.vocab_size, self.tp_group = vocab_size, group

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        full = self.tp_group.all_gather_last(F.linear(hidden, self.weight))   # (N, vocab_padded)
        return full[..., : self.vocab_size]


#: The attention classes tensor parallelism splits -> their parameters with one entry per query head (resized
#: to this rank's heads here, read by ``SPLITS``'s head span at load).
PER_HEAD_PARAMETERS: dict[type[Attention], tuple[str, ...]] = {Attention: (), SinkAttention: ("sinks",)}


def make_tensor_parallel(lm: DecoderForCausalLM, plan: ShardPlan, group: TPGroup) -> None:
    """Swap ``lm``'s split layers for their local-size parallel versions (call on the meta device)."""
    hidden = lm.config.hidden_size
    d = plan.head_dim
    q_size, kv_size = plan.heads_per_rank * d, plan.kv_heads_per_rank * d
    inter = plan.intermediate_per_rank
    for layer in lm.model.decoder_layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.num_heads, attn.num_kv_heads, attn.q_size, attn.kv_size = (plan.heads_per_rank, plan.kv_heads_per_rank,
                                                                        q_size, kv_size)
        qkv_proj = nn.Linear(hidden, q_size + 2 * kv_size, bias=attn.qkv_proj.bias is not None)
        set_shards(qkv_proj, {"q": q_size, "k": kv_size, "v": kv_size})
        attn.qkv_proj = qkv_proj
        attn.o_proj = RowParallelLinear(q_size, hidden, attn.o_proj.bias is not None, group)
        for name in PER_HEAD_PARAMETERS[type(attn)]:
            setattr(attn, name, nn.Parameter(torch.empty(plan.heads_per_rank)))
        if isinstance(mlp, SparseMoE):
            layer.mlp = ExpertParallelMoE(lm.config, group, plan.expert_range(), **mlp.settings())
            continue
        assert isinstance(mlp, GatedMLP), "check_family refuses other feed-forward parts before loading"
        mlp.intermediate_size = inter
        gate_up_proj = nn.Linear(hidden, 2 * inter, bias=mlp.gate_up_proj.bias is not None)
        set_shards(gate_up_proj, {0: inter, 1: inter})
        mlp.gate_up_proj = gate_up_proj
        mlp.down_proj = RowParallelLinear(inter, hidden, mlp.down_proj.bias is not None, group)
    lm.model.embed_tokens = VocabParallelEmbedding(plan.vocab_per_rank, hidden, plan.vocab_start, group)
    lm.lm_head = VocabParallelLMHead(hidden, plan.vocab_per_rank, plan.vocab_size, group)
    lm.tp_plan = plan  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------------
# Slicing rules: our parameter -> how to read this rank's part of the checkpoint tensor
# ---------------------------------------------------------------------------------------------------

Span = Callable[[ShardPlan], "tuple[int, int, int]"]


@dataclass(frozen=True)
class Split:
    """``dim`` 0: rows (column-parallel / vocabulary); 1: columns (row-parallel). ``parts``: for a fused
    parameter, its shard ids in row order with the span of each (a checkpoint tensor may hold one part,
    shard id given, or all of them fused, shard id None)."""

    dim: int
    span: Span | None = None
    parts: tuple[tuple[object, Span], ...] = ()


SPLITS: dict[str, Split] = {
    "self_attn.qkv_proj": Split(0, parts=(("q", ShardPlan.heads), ("k", ShardPlan.kv_heads),
                                          ("v", ShardPlan.kv_heads))),
    "self_attn.o_proj": Split(1, ShardPlan.heads),
    "self_attn.sinks": Split(0, ShardPlan.head_ids),
    "mlp.gate_up_proj": Split(0, parts=((0, ShardPlan.intermediate), (1, ShardPlan.intermediate))),
    "mlp.down_proj": Split(1, ShardPlan.intermediate),
    "model.embed_tokens": Split(0, ShardPlan.vocab),
    "lm_head": Split(0, ShardPlan.vocab),
}


def _read_rows(lazy: LazyTensor, start: int, size: int, dim: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) [start, start + size), zero-padded past the tensor's end (vocab)."""
    stop = min(start + size, lazy.shape[dim])
    part = lazy[start:stop] if dim == 0 else lazy[:, start:stop]
    if stop - start < size:
        pad = list(part.shape)
        pad[dim] = size - max(stop - start, 0)
        part = torch.cat([part, part.new_zeros(pad)], dim=dim)
    return part


def read_split(lazy: LazyTensor, split: Split, shard: object, plan: ShardPlan) -> torch.Tensor:
    if not split.parts:
        assert split.span is not None
        _, start, size = split.span(plan)
        return _read_rows(lazy, start, size, split.dim)
    spans = dict(split.parts)
    if shard is not None:
        _, start, size = spans[shard](plan)
        return _read_rows(lazy, start, size, 0)
    pieces, offset = [], 0           # the fused tensor: each part's local rows at its global offset
    for _, span in split.parts:
        total, start, size = span(plan)
        pieces.append(_read_rows(lazy, offset + start, size, 0))
        offset += total
    assert offset == lazy.shape[0], (offset, lazy.shape)
    return torch.cat(pieces, dim=0)


def read_grouped_wqkv(lazy: LazyTensor, plan: ShardPlan) -> torch.Tensor:
    """InternLM2 ``wqkv`` (rows grouped per KV head: g query heads, then k, then v) -> this rank's
    [q; k; v] rows. A rank's query heads always lie in whole KV groups (KV heads split) or inside one
    group (KV heads replicated), so it reads only those groups' rows."""
    d = plan.head_dim
    g = plan.num_heads // plan.num_kv_heads
    group_rows = (g + 2) * d
    first, count = plan.kv_head_start, plan.kv_heads_per_rank
    w = lazy[first * group_rows:(first + count) * group_rows]
    w = w.reshape(count, g + 2, d, w.shape[-1])
    if plan.kv_replicated:
        sub = plan.rank % (plan.tp // plan.num_kv_heads)                  # which share of the group's q heads
        q = w[:, sub * plan.heads_per_rank:(sub + 1) * plan.heads_per_rank]
    else:
        q = w[:, :g]
    return torch.cat([q.reshape(-1, w.shape[-1]), w[:, g].reshape(-1, w.shape[-1]),
                      w[:, g + 1].reshape(-1, w.shape[-1])], dim=0)


WholeTransform = Callable[[LLMConfig, torch.Tensor], torch.Tensor]
SliceReader = Callable[[LazyTensor, ShardPlan], torch.Tensor]

#: A family's whole-tensor transform -> the reader that does the same on a rank's slice.
GROUPED_READERS: dict[WholeTransform, SliceReader] = {ungroup_wqkv: read_grouped_wqkv}

#: Whole-tensor transforms of stacked experts that act expert by expert along the checkpoint tensor's first
#: dimension (GPT-OSS's): a rank applies them to its experts' rows only (``read_experts``).
EXPERT_WISE_TRANSFORMS: frozenset[WholeTransform] = frozenset({gate_up_weight, gate_up_bias, down_weight, flat_bias})


def read_experts(lazy: LazyTensor, plan: ShardPlan) -> torch.Tensor:
    """Rows [first, first + count) of a checkpoint tensor stacked by expert (E, ...): this rank's experts."""
    assert lazy.shape[0] == plan.num_experts, (lazy.shape, plan.num_experts)
    return lazy[plan.expert_start:plan.expert_start + plan.experts_per_rank]


def check_family(lm: DecoderForCausalLM) -> None:
    """Every layer must be one this file splits, and every tensor transform the family declares must have a
    slice reader (checked before loading)."""
    for i, layer in enumerate(lm.model.decoder_layers):
        if type(layer.self_attn) not in PER_HEAD_PARAMETERS or type(layer.mlp) not in (GatedMLP, SparseMoE):
            raise UnsupportedFeature(
                f"{type(lm).__name__} layer {i} has {type(layer.self_attn).__name__} / {type(layer.mlp).__name__}: "
                "tensor parallelism splits the Llama attention (with GPT-OSS's sinks), the gated MLP and the "
                "mixture of experts only")
    for suffix, fn in lm.tensor_transforms.items():
        if fn not in GROUPED_READERS and fn not in EXPERT_WISE_TRANSFORMS:
            raise UnsupportedFeature(f"{type(lm).__name__} transforms {suffix} at load, and no tensor-parallel "
                                     "reader for that layout is declared in distributed/layers.py "
                                     "(GROUPED_READERS, EXPERT_WISE_TRANSFORMS)")


#: Our stacked expert parameters (``SparseMoE``), filled per expert: shard id (expert, part).
EXPERT_STACKS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def tp_resolver(resolve: Resolver, lm: DecoderForCausalLM, plan: ShardPlan) -> Resolver:
    """Wrap a model's ``resolve_checkpoint_name`` so that split parameters read only this rank's slice."""

    def resolver(name: str) -> tuple[str, object, Transform | LazyTransform | None] | None:
        target = resolve(name)
        if target is None or not target[0].startswith("language_model."):
            return target
        ours, shard, transform = target
        full = ours.removeprefix("language_model.")
        piece, _, kind = full.rpartition(".")
        if piece.endswith(EXPERT_STACKS) and isinstance(shard, tuple) and transform is None:
            expert, part = shard
            local = expert - plan.expert_start
            return (ours, (local, part), None) if 0 <= local < plan.experts_per_rank else ELSEWHERE
        split = next((s for key, s in SPLITS.items() if piece.endswith(key) or full.endswith(key)), None)
        if transform is not None:
            suffix = next(k for k in lm.tensor_transforms if ours.endswith(k))
            whole = lm.tensor_transforms[suffix]
            if whole in EXPERT_WISE_TRANSFORMS:
                assert not isinstance(transform, LazyTransform)
                expert_wise = transform
                return ours, shard, LazyTransform(lambda lazy: expert_wise(read_experts(lazy, plan)))
            reader = GROUPED_READERS[whole]
            return ours, shard, LazyTransform(lambda lazy: reader(lazy, plan))
        if split is None:
            return target                                           # replicated (norms)
        if kind == "bias" and split.dim == 1:
            return target                                           # row-parallel bias: whole, added once
        return ours, shard, LazyTransform(lambda lazy: read_split(lazy, split, shard, plan))

    return resolver
