"""Mixture-of-experts feed-forward over stacked expert weights: the tokens grouped by expert, one pass per expert.

Operators only (no model class). Weights in ``nn.Linear``'s convention, stacked over experts:
``w13`` (E, 2I, hidden): each expert's gate rows, then its up rows; ``w2`` (E, hidden, I); optional biases
``b13`` (E, 2I) and ``b2`` (E, hidden). ``topk_ids`` / ``topk_weights`` (T, k): the experts each token goes to
and their weights (the router's business, not this module's).

Quantized experts (``quantization.QuantizedExperts``): ``w13`` / ``w2`` int8 (E, N, K) with per-row scales
``s13`` / ``s2`` (E, N) (``Int8Linear``'s format, per expert), or int4 in the native packed layout
(``packing.pack_int4``: (E, N, K / 2) uint8) with ``s13`` / ``s2`` the scales and zeros (E, N, K / group, 2)
and the group size ``g13`` / ``g2`` > 0 (``Int4Linear``'s "native" format, per expert; each stack its own,
as each stack's input width allows; 0 for an int8 or float stack). This path dequantizes one expert at a
time, into the activations' dtype, just before its matmuls: never the whole stack.

Expert parallelism: ``first_expert`` says which experts the stacks hold (global ids ``first_expert ..
first_expert + E - 1``); pairs routed to other experts contribute nothing here.

The CPU path sorts the (token, slot) pairs by expert once and runs each expert over its tokens as two
matmuls (the way the official code loops over experts, so sums come in the same order: experts ascending);
``grouped_experts_reference`` is the plain per-token loop the tests hold it to.

Activations (``activation``):
- ``"silu"``: silu(gate) * up (Qwen3-MoE, Llama-style experts);
- ``"gpt_oss"``: GPT-OSS's clamped SwiGLU: gate clamped above at ``limit``, up clamped to +-``limit``,
  gate * sigmoid(alpha * gate) * (up + 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from .ops import dequantize_int4

Activation = Literal["silu", "gpt_oss"]
#: ``F.linear``'s signature: how each expert's two products are computed (a compute plan's GEMV kernel for
#: decode rows on the CPU, or ``F.linear``).
LinearFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def expert_activation(gate_up: torch.Tensor, activation: Activation, limit: float | None = None,
                      alpha: float = 1.702) -> torch.Tensor:
    """(n, 2I) [gate | up] -> (n, I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gpt_oss":
        if limit is not None:
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"unknown expert activation {activation!r}")


class ExpertStack(NamedTuple):
    """One projection of every expert as a layer stores it: ``weight`` (E, N, K) float / int8, or (E, N, K / 2)
    packed int4; ``bias`` (E, N) or None; ``scales`` None (float), (E, N) (int8) or (E, N, K / group, 2)
    (int4 scales and zeros); ``group_size`` 0 unless int4."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scales: torch.Tensor | None = None
    group_size: int = 0


def expert_weight(w: torch.Tensor, scales: torch.Tensor | None, group_size: int, e: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Expert ``e``'s (N, K) weight in ``dtype``: as stored, or dequantized (int8: scaled in fp32, one
    rounding; int4: ``kernels.dequantize_int4``)."""
    if scales is None:
        return w[e] if w.dtype == dtype else w[e].to(dtype)
    if group_size:
        return dequantize_int4(w[e], scales[e], group_size, dtype)
    return (w[e].float() * scales[e].float()[:, None]).to(dtype)


def _expert(x: torch.Tensor, e: int, w13: torch.Tensor, w2: torch.Tensor, b13: torch.Tensor | None,
            b2: torch.Tensor | None, activation: Activation, limit: float | None, alpha: float,
            s13: torch.Tensor | None = None, s2: torch.Tensor | None = None, g13: int = 0, g2: int = 0,
            linear: LinearFn = F.linear) -> torch.Tensor:
    h = linear(x, expert_weight(w13, s13, g13, e, x.dtype), None if b13 is None else b13[e].to(x.dtype))
    return linear(expert_activation(h, activation, limit, alpha), expert_weight(w2, s2, g2, e, x.dtype),
                  None if b2 is None else b2[e].to(x.dtype))


def grouped_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, *,
                    activation: Activation = "silu", limit: float | None = None, alpha: float = 1.702,
                    s13: torch.Tensor | None = None, s2: torch.Tensor | None = None, g13: int = 0, g2: int = 0,
                    first_expert: int = 0, linear: LinearFn = F.linear) -> torch.Tensor:
    """x (T, hidden) -> (T, hidden): sum over each token's k experts of weight * expert(x), in x's dtype.
    ``linear`` computes each expert's products (``F.linear`` unless a compute plan gives its kernel)."""
    num_experts, k = w13.shape[0], topk_ids.shape[1]
    flat = topk_ids.reshape(-1) - first_expert
    held = (flat >= 0) & (flat < num_experts)
    flat = torch.where(held, flat, torch.full_like(flat, num_experts))      # other ranks' experts: one bucket
    order = torch.argsort(flat, stable=True)               # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()
    weights = topk_weights.reshape(-1)
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts[:num_experts]):
        if n == 0:
            continue
        pairs = order[start:start + n]
        start += n
        tokens = pairs // k
        y = _expert(x.index_select(0, tokens), e, w13, w2, b13, b2, activation, limit, alpha, s13, s2, g13, g2,
                    linear)
        y = (y * weights.index_select(0, pairs)[:, None].to(y.dtype)).to(x.dtype)
        # out[tokens] += y: a token meets an expert once, so this is the official index_add_ (same sums, same
        # rounding) without its CPU path for 16-bit types (~17 ms for one 2048-wide bf16 row on a busy host)
        out.index_copy_(0, tokens, out.index_select(0, tokens) + y)
    return out


def grouped_experts_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                              w13: torch.Tensor, w2: torch.Tensor, b13: torch.Tensor | None = None,
                              b2: torch.Tensor | None = None, *, activation: Activation = "silu",
                              limit: float | None = None, alpha: float = 1.702,
                              s13: torch.Tensor | None = None, s2: torch.Tensor | None = None,
                              g13: int = 0, g2: int = 0, first_expert: int = 0) -> torch.Tensor:
    """The same, token by token and slot by slot (for tests)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j]) - first_expert
            if not 0 <= e < w13.shape[0]:
                continue
            y = _expert(x[t:t + 1], e, w13, w2, b13, b2, activation, limit, alpha, s13, s2, g13, g2)
            out[t] += (y[0] * topk_weights[t, j].to(y.dtype)).to(x.dtype)
    return out
