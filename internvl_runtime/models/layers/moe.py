"""A mixture-of-experts feed-forward layer: a router, then each token through its top-k experts.

The experts are stored stacked, in ``nn.Linear``'s convention (``StackedExperts``: one (E * out, in) weight,
expert ``e``'s rows at ``e * out``), filled per expert from the checkpoint through the loader's shard offsets
(shard id ``(expert, part)``); a family whose checkpoint already stacks them (GPT-OSS) fills the whole tensor
through a transform. The compute is ``kernels.moe.grouped_experts`` (tokens grouped by expert).

Routing, as each family computes it (``routing``):
- ``"softmax_topk"`` (Qwen3-MoE): softmax over all experts in float32, top-k, renormalised to sum 1 when
  ``norm_topk_prob``, cast to the activations' dtype;
- ``"topk_softmax"`` (GPT-OSS): top-k of the logits (the router has a bias), softmax over those k.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, cast

import torch
from torch import nn

from ...config import LLMConfig
from ...kernels.moe import Activation, grouped_experts
from .linear import Linear, planned_linear

Routing = Literal["softmax_topk", "topk_softmax"]


class StackedExperts(nn.Module):
    """``num_experts`` projections of (out, in), as one (num_experts * out, in) weight (and bias)."""

    def __init__(self, num_experts: int, in_features: int, parts: tuple[int, ...], bias: bool) -> None:
        super().__init__()
        self.num_experts, self.in_features = num_experts, in_features
        self.out_features = sum(parts)                    # per expert
        self.weight = nn.Parameter(torch.empty(num_experts * self.out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts * self.out_features)) if bias else None
        offsets, start = {}, 0
        for e in range(num_experts):
            for part, size in enumerate(parts):
                offsets[(e, part)] = (start, size)
                start += size
        self.shard_offsets = offsets

    def stacked_weight(self) -> torch.Tensor:
        return self.weight.view(self.num_experts, self.out_features, self.in_features)

    def stacked_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.view(self.num_experts, self.out_features)


class SparseMoE(nn.Module):
    """router (``gate``) -> top-k experts -> weighted sum. Names follow Qwen3-MoE's checkpoint
    (``mlp.gate``, ``mlp.experts``); other families rename to them."""

    def __init__(self, config: LLMConfig, *, routing: Routing, activation: Activation = "silu",
                 router_bias: bool = False, expert_bias: bool = False, limit: float | None = None,
                 alpha: float = 1.702) -> None:
        super().__init__()
        moe = config.moe
        assert moe is not None, "SparseMoE needs llm_config's experts (config.moe)"
        self.num_experts, self.top_k, self.norm_topk_prob = moe.num_experts, moe.experts_per_token, moe.norm_topk_prob
        self.routing, self.activation, self.limit, self.alpha = routing, activation, limit, alpha
        width = moe.expert_intermediate_size
        self.gate = Linear(config.hidden_size, moe.num_experts, bias=router_bias)
        self.experts = nn.ModuleDict({
            "gate_up_proj": StackedExperts(moe.num_experts, config.hidden_size, (width, width), expert_bias),
            "down_proj": StackedExperts(moe.num_experts, width, (config.hidden_size,), expert_bias),
        })

    @property
    def experts_gate_up(self) -> StackedExperts:
        return cast(StackedExperts, self.experts["gate_up_proj"])

    @property
    def experts_down(self) -> StackedExperts:
        return cast(StackedExperts, self.experts["down_proj"])

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> (topk_weights (T, k) in x's dtype, topk_ids (T, k))."""
        logits = self.gate(x)
        if self.routing == "softmax_topk":
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            weights, ids = torch.topk(probs, self.top_k, dim=-1)
            if self.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return weights.to(x.dtype), ids
        values, ids = torch.topk(logits, self.top_k, dim=-1)
        return torch.softmax(values, dim=-1, dtype=values.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        up, down = self.experts_gate_up, self.experts_down
        # the experts compute as the router's Linear does under the host's compute plan (the bf16 GEMV kernel
        # for decode rows on the CPU; float32 on hosts whose 16-bit products are slow), one expert at a time
        return grouped_experts(x, ids, weights, up.stacked_weight(), down.stacked_weight(), up.stacked_bias(),
                               down.stacked_bias(), activation=self.activation, limit=self.limit, alpha=self.alpha,
                               linear=partial(planned_linear, self.gate.plan))
