"""A mixture-of-experts feed-forward layer: a router, then each token through its top-k experts.

The experts are stored stacked, in ``nn.Linear``'s convention (``StackedExperts``: one (E * out, in) weight,
expert ``e``'s rows at ``e * out``), filled per expert from the checkpoint through the loader's shard offsets
(shard id ``(expert, part)``); a family whose checkpoint already stacks them (GPT-OSS) fills the whole tensor
through a transform. The compute: ``kernels.triton_moe.triton_grouped_experts`` (two Triton launches over all
experts) where ``kernels.triton_moe.moe_backend`` says so (CUDA with triton), else ``kernels.moe.grouped_experts``
(tokens grouped by expert, one pair of matmuls per expert); int4 experts always take the latter.

The experts are any module with ``stacked() -> kernels.moe.ExpertStack`` (``StackedExperts`` here, the
quantized ones in ``quantization.QuantizedExperts``). With expert parallelism a rank's ``SparseMoE`` holds
experts ``first_expert .. first_expert + num_local_experts - 1`` only, routes over all of them and computes
its experts' share (``distributed`` sums the shares).

Routing, as each family computes it (``routing``):
- ``"softmax_topk"`` (Qwen3-MoE): softmax over all experts in float32, top-k, renormalised to sum 1 when
  ``norm_topk_prob``, cast to the activations' dtype;
- ``"topk_softmax"`` (GPT-OSS): top-k of the logits (the router has a bias), softmax over those k.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal, Protocol, cast

import torch
from torch import nn

from ...config import LLMConfig
from ...kernels.moe import Activation, ExpertStack, grouped_experts
from ...kernels.triton_moe import moe_backend, triton_grouped_experts
from .linear import Linear, planned_linear

Routing = Literal["softmax_topk", "topk_softmax"]


class ExpertWeights(Protocol):
    """What the experts' modules have (``StackedExperts``, ``quantization.QuantizedExperts``)."""

    def stacked(self) -> ExpertStack: ...


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

    def stacked(self) -> ExpertStack:
        """The weights as the grouped-expert operators take them."""
        return ExpertStack(self.stacked_weight(), self.stacked_bias())


class Router(Linear):
    """The router of a ``SparseMoE`` (``mlp.gate``): a linear layer that stays in the model dtype when the
    rest is quantized (``quantization.LayerQuantizer`` skips this class: a small layer whose errors would
    change which experts run)."""


class SparseMoE(nn.Module):
    """router (``gate``) -> top-k experts -> weighted sum. Names follow Qwen3-MoE's checkpoint
    (``mlp.gate``, ``mlp.experts``); other families rename to them."""

    def __init__(self, config: LLMConfig, *, routing: Routing, activation: Activation = "silu",
                 router_bias: bool = False, expert_bias: bool = False, limit: float | None = None,
                 alpha: float = 1.702, expert_range: tuple[int, int] | None = None) -> None:
        """``expert_range``: (first, count) of the experts this module holds (expert parallelism); all by default."""
        super().__init__()
        moe = config.moe
        assert moe is not None, "SparseMoE needs llm_config's experts (config.moe)"
        self.num_experts, self.top_k, self.norm_topk_prob = moe.num_experts, moe.experts_per_token, moe.norm_topk_prob
        self.routing, self.activation, self.limit, self.alpha = routing, activation, limit, alpha
        self.router_bias, self.expert_bias = router_bias, expert_bias
        self.first_expert, self.num_local_experts = expert_range or (0, moe.num_experts)
        assert self.first_expert >= 0 and self.first_expert + self.num_local_experts <= moe.num_experts, expert_range
        width, local = moe.expert_intermediate_size, self.num_local_experts
        self.gate = Router(config.hidden_size, moe.num_experts, bias=router_bias)
        self.experts = nn.ModuleDict({
            "gate_up_proj": StackedExperts(local, config.hidden_size, (width, width), expert_bias),
            "down_proj": StackedExperts(local, width, (config.hidden_size,), expert_bias),
        })

    def settings(self) -> dict[str, Any]:
        """The family's choices this layer was built with (keyword arguments of ``__init__``, the expert range
        aside): what a parallel version of the layer is built with."""
        return dict(routing=self.routing, activation=self.activation, router_bias=self.router_bias,
                    expert_bias=self.expert_bias, limit=self.limit, alpha=self.alpha)

    @property
    def experts_gate_up(self) -> StackedExperts:
        """The gate/up stack while it is float (``quantization`` may replace it by a quantized one)."""
        return cast(StackedExperts, self.experts["gate_up_proj"])

    @property
    def experts_down(self) -> StackedExperts:
        return cast(StackedExperts, self.experts["down_proj"])

    def expert_stacks(self) -> tuple[ExpertStack, ExpertStack]:
        """(gate_up, down) as the operators take them, float or quantized."""
        up, down = (cast(ExpertWeights, self.experts[name]) for name in ("gate_up_proj", "down_proj"))
        return up.stacked(), down.stacked()

    def capturable(self, device: torch.device) -> bool:
        """Whether ``forward`` on ``device`` can be captured in a CUDA graph: the Triton path reads nothing
        back to the host; the per-expert path (no triton, or int4 experts) reads the expert counts."""
        up, down = self.expert_stacks()
        return device.type != "cuda" or (moe_backend(device) == "triton" and up.group_size == down.group_size == 0)

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
        up, down = self.expert_stacks()
        if moe_backend(x.device) == "triton" and up.group_size == down.group_size == 0:
            return triton_grouped_experts(x, ids, weights, up.weight, down.weight, up.bias, down.bias,
                                          s13=up.scales, s2=down.scales, activation=self.activation,
                                          limit=self.limit, alpha=self.alpha, first_expert=self.first_expert)
        # the experts compute as the router's Linear does under the host's compute plan (the bf16 GEMV kernel
        # for decode rows on the CPU; float32 on hosts whose 16-bit products are slow), one expert at a time
        return grouped_experts(x, ids, weights, up.weight, down.weight, up.bias, down.bias, activation=self.activation,
                               limit=self.limit, alpha=self.alpha, s13=up.scales, s2=down.scales,
                               g13=up.group_size, g2=down.group_size, first_expert=self.first_expert,
                               linear=partial(planned_linear, self.gate.plan))
