"""The mixture-of-experts feed-forward on the GPU: two Triton launches over all experts at once.

Why: ``kernels.moe.grouped_experts`` (the CPU path) runs one pair of matmuls per expert, a loop of up to
2 x 128 small launches per layer on a GPU, each a host round trip. Here the (token, slot) pairs are sorted
by expert into per-expert blocks of ``block_m`` rows (vLLM's ``moe_align_block_size`` idea: each expert's
rows padded to a multiple of the block, so a block never mixes experts), all on the device with no host
sync (the launch is sized by an upper bound, blocks past the end do nothing), so the whole step can be
captured in a CUDA graph. Then one launch computes gate and up for every block, fuses the activation
("silu", or GPT-OSS's clamped SwiGLU with biases) and writes the intermediate; one launch computes down,
the bias and the router weight, and writes each pair's row; the k rows of each token are summed in fp32
and rounded once to ``x``'s dtype.

Weights: as ``grouped_experts`` takes them (``w13`` (E, 2I, H), ``w2`` (E, H, I), biases (E, 2I) / (E, H)),
in the activations' dtype, or int8 with per-row scales ``s13`` (E, 2I) / ``s2`` (E, H) (``Int8Linear``'s
format per expert: the codes widened in registers, the scales applied to the fp32 sums).
``first_expert``: with expert parallelism a rank holds experts ``first_expert .. first_expert + E - 1``
only; pairs routed elsewhere contribute nothing here (their rank adds them in the all-reduce).

Triton is optional: importing this module never imports it. ``moe_backend`` is the one owner of the choice
between this path and ``grouped_experts``; ``kernel_runs_on`` says whether the kernel can run at all (on the
CPU only under ``TRITON_INTERPRET=1``, which is how the tests run it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from . import _triton_support
from ._triton_support import KernelCall, triton_available
from .moe import Activation

_KERNELS = "_triton_moe_kernel"
_ACTIVATIONS = {"silu": 0, "gpt_oss": 1}

MoEBackend = Literal["torch", "triton"]


def kernel_runs_on(device: torch.device) -> bool:
    """Whether ``triton_grouped_experts`` can run its kernels for tensors on ``device``."""
    return _triton_support.runs_on(device, _KERNELS)


def moe_backend(device: torch.device) -> MoEBackend:
    """The experts' compute for activations on ``device`` (the one place this is decided): "triton" on a
    CUDA device when triton is installed, else "torch" (``kernels.moe.grouped_experts``; the CPU always,
    where the per-expert matmuls are the fast path)."""
    return "triton" if device.type == "cuda" and triton_available() else "torch"


@dataclass(frozen=True)
class AlignedPairs:
    """The (token, slot) pairs in per-expert blocks: ``sorted_ids`` (rows,) int32, the pair index of each
    row (``num_pairs`` on padding); ``block_expert`` (rows // block_m,) int32, each block's local expert,
    -1 for a block past the end."""

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    block_m: int
    num_pairs: int


def choose_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block from the average pairs per expert (host values only): decode's few tokens per expert
    take 16-row blocks (little padding), a prefill's take up to 64 (each weight tile serves more rows)."""
    per_expert = num_pairs / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int, first_expert: int = 0) -> AlignedPairs:
    """Sort the pairs of ``topk_ids`` (T, k) by expert into blocks of ``block_m`` rows, on ``topk_ids``'s
    device without reading anything back (sized by the bound: pairs + (block_m - 1) per expert hit).
    Experts outside ``first_expert .. first_expert + num_experts - 1`` are dropped."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64) - first_expert
    n = flat.numel()
    bucket = torch.where((flat >= 0) & (flat < num_experts), flat, torch.full_like(flat, num_experts))
    # the last bucket: dropped pairs. scatter_add, not bincount: CUDA's bincount reads its input's max back
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).scatter_add_(
        0, bucket, torch.ones_like(bucket))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts] = 0
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(bucket, stable=True)
    sorted_bucket = bucket[order]
    rank = torch.arange(n, device=device) - start[sorted_bucket]
    max_rows = -(-(n + min(num_experts, n) * (block_m - 1)) // block_m) * block_m
    dest = torch.where(sorted_bucket < num_experts, padded_start[sorted_bucket] + rank,
                       torch.full_like(rank, max_rows))                     # dropped pairs: one spare slot
    sorted_ids = torch.full((max_rows + 1,), n, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, max_rows, block_m, device=device)
    expert = torch.searchsorted(padded_end[:num_experts].contiguous(), block_starts, right=True)
    block_expert = torch.where(expert < num_experts, expert, torch.full_like(expert, -1)).to(torch.int32)
    return AlignedPairs(sorted_ids[:max_rows], block_expert, block_m, n)


def _check(x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
           s13: torch.Tensor | None, s2: torch.Tensor | None) -> None:
    """Shapes and dtypes (metadata only: the callers are the layers, so these are invariants)."""
    e, two_i, h = w13.shape
    assert x.dim() == 2 and x.shape[1] == h and two_i % 2 == 0, (x.shape, w13.shape)
    assert w2.shape == (e, h, two_i // 2), (w2.shape, w13.shape)
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == x.shape[0], (topk_ids.shape, x.shape)
    quantized = w13.dtype == torch.int8
    assert (w2.dtype == torch.int8) == quantized and (s13 is not None) == quantized == (s2 is not None)
    assert quantized or w13.dtype == x.dtype == w2.dtype, (x.dtype, w13.dtype, w2.dtype)


def triton_grouped_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                           w13: torch.Tensor, w2: torch.Tensor, b13: torch.Tensor | None = None,
                           b2: torch.Tensor | None = None, *, s13: torch.Tensor | None = None,
                           s2: torch.Tensor | None = None, activation: Activation = "silu",
                           limit: float | None = None, alpha: float = 1.702, first_expert: int = 0
                           ) -> torch.Tensor:
    """``kernels.moe.grouped_experts`` in two Triton launches: x (T, H) -> (T, H) in x's dtype (fp32
    sums, one rounding of the gate/up product and one of the output)."""
    _check(x, topk_ids, w13, w2, s13, s2)
    assert kernel_runs_on(x.device), "triton_grouped_experts needs a CUDA tensor or TRITON_INTERPRET=1"
    t, k = topk_ids.shape
    if t == 0:
        return torch.zeros_like(x)
    num_experts, inter = w13.shape[0], w2.shape[2]
    aligned = align_pairs(topk_ids, num_experts, choose_block_m(t * k, num_experts), first_expert)
    x = x.contiguous()
    h = torch.empty((aligned.sorted_ids.shape[0], inter), dtype=x.dtype, device=x.device)
    out_pairs = torch.zeros((t * k, x.shape[1]), dtype=torch.float32, device=x.device)
    kernel = _triton_support.load(_KERNELS)
    for call in grouped_experts_kernel_calls(
            out_pairs, h, x, topk_weights.reshape(-1).contiguous(), w13.contiguous(), w2.contiguous(),
            b13, b2, s13, s2, aligned, top_k=k, activation=activation, limit=limit, alpha=alpha,
            interpreted=kernel.INTERPRETED):
        call.launch(kernel)
    return out_pairs.view(t, k, -1).sum(dim=1).to(x.dtype)


def grouped_experts_kernel_calls(out_pairs: torch.Tensor, h: torch.Tensor, x: torch.Tensor,
                                 topk_weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                                 b13: torch.Tensor | None, b2: torch.Tensor | None, s13: torch.Tensor | None,
                                 s2: torch.Tensor | None, aligned: AlignedPairs, *, top_k: int,
                                 activation: Activation, limit: float | None, alpha: float,
                                 interpreted: bool) -> list[KernelCall]:
    """The two launches ``triton_grouped_experts`` makes, as data (contiguous tensors; ``interpreted``:
    for triton's interpreter, whose ``tl.dot`` needs 16-bit operands widened)."""
    two_i, hidden = w13.shape[1:]
    inter = two_i // 2
    widen = interpreted and x.dtype != torch.float32
    precision = "ieee" if x.dtype == torch.float32 or widen else None
    blocks = aligned.sorted_ids.shape[0] // aligned.block_m
    quantized = s13 is not None
    tiles = dict(BLOCK_M=aligned.block_m, BLOCK_N=64, BLOCK_K=64, DOT_PRECISION=precision, DOT_IN_FP32=widen)
    gate_up = KernelCall(
        kernel="moe_gate_up_kernel",
        grid=(blocks, -(-inter // 64)),
        args=(h, x, w13, s13 if s13 is not None else x, b13 if b13 is not None else x,   # any pointer if unused
              aligned.sorted_ids, aligned.block_expert,
              aligned.num_pairs, top_k, inter, hidden,
              x.stride(0), w13.stride(0), w13.stride(1), two_i, two_i, h.stride(0),
              float(limit) if limit is not None else 0.0, float(alpha)),
        constants=dict(ACTIVATION=_ACTIVATIONS[activation], HAS_LIMIT=limit is not None, HAS_BIAS=b13 is not None,
                       W_INT8=quantized, **tiles))
    down = KernelCall(
        kernel="moe_down_kernel",
        grid=(blocks, -(-hidden // 64)),
        args=(out_pairs, h, w2, s2 if s2 is not None else x, b2 if b2 is not None else x, topk_weights,
              aligned.sorted_ids, aligned.block_expert,
              aligned.num_pairs, hidden, inter,
              h.stride(0), w2.stride(0), w2.stride(1), hidden, hidden, out_pairs.stride(0)),
        constants=dict(HAS_BIAS=b2 is not None, W_INT8=quantized, **tiles))
    return [gate_up, down]


__all__ = [
    "AlignedPairs",
    "MoEBackend",
    "align_pairs",
    "choose_block_m",
    "grouped_experts_kernel_calls",
    "kernel_runs_on",
    "moe_backend",
    "triton_available",
    "triton_grouped_experts",
]
