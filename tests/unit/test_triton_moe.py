"""The Triton grouped expert GEMM (``kernels.triton_moe.triton_grouped_experts``), run on CPU tensors by
triton's interpreter, against ``kernels.moe.grouped_experts_reference`` (the plain per-token loop).

Routings cover every expert hit and some unhit, k = 1 / 2 / 4, T = 1 .. 37 (so per-expert blocks are
partly padded, and several blocks per expert), widths that are not multiples of the 64-wide tiles,
both activations (GPT-OSS's with biases and its clamp), int8 experts, and a rank's slice of the experts
(expert parallelism). Tolerances against the fp32 reference: fp32 1e-5. bf16: the interpreter widens the
operands to fp32 (its ``tl.dot`` cannot take bf16), so the kernel's only roundings are the intermediate's
and the output's; the reference rounds after every matmul and every slot's sum, so the two differ by a
few bf16 ulps (2^-7 relative): 3e-2 absolute + 2e-2 relative on O(1) outputs.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is defined: before it is imported

import pytest
import torch

pytest.importorskip("triton")

from internvl_runtime.kernels.moe import grouped_experts, grouped_experts_reference
from internvl_runtime.kernels.triton_moe import (
    align_pairs,
    choose_block_m,
    kernel_runs_on,
    moe_backend,
    triton_grouped_experts,
)
from internvl_runtime.quantization.linear import quantize_int8


def routing(t: int, k: int, num_experts: int, seed: int, hit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct experts per token among the first ``hit`` (all by default), and softmax weights."""
    g = torch.Generator().manual_seed(seed)
    pool = hit or num_experts
    ids = torch.stack([torch.randperm(pool, generator=g)[:k] for _ in range(t)])
    return ids, torch.softmax(torch.randn(t, k, generator=g), dim=-1)


def experts(num_experts: int, hidden: int, inter: int, seed: int, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5
    b13 = torch.randn(num_experts, 2 * inter, generator=g) if bias else None
    b2 = torch.randn(num_experts, hidden, generator=g) if bias else None
    return w13, w2, b13, b2


def test_the_kernel_runs_under_the_interpreter_and_the_cpu_keeps_the_torch_path() -> None:
    assert kernel_runs_on(torch.device("cpu"))
    assert moe_backend(torch.device("cpu")) == "torch"
    assert moe_backend(torch.device("cuda")) == "triton"


@pytest.mark.parametrize(("t", "k", "num_experts", "hit"), [
    (1, 1, 4, None), (1, 4, 8, None), (5, 2, 4, None), (7, 2, 8, 5), (16, 1, 3, None), (17, 4, 6, None),
    (37, 2, 8, None), (37, 4, 16, 9), (30, 1, 2, None)])
def test_fp32_matches_the_reference(t: int, k: int, num_experts: int, hit: int | None) -> None:
    x = torch.randn(t, 48, generator=torch.Generator().manual_seed(t))
    ids, weights = routing(t, k, num_experts, seed=t * 10 + k, hit=hit)
    w13, w2, _, _ = experts(num_experts, 48, 40, seed=num_experts)
    out = triton_grouped_experts(x, ids, weights, w13, w2)
    torch.testing.assert_close(out, grouped_experts_reference(x, ids, weights, w13, w2), atol=1e-5, rtol=1e-5)
    if hit is not None:
        assert not bool(torch.isin(torch.arange(hit, num_experts), ids).any())    # some experts unhit indeed


@pytest.mark.parametrize("t", [1, 13, 37])
def test_gpt_oss_activation_with_biases_and_clamp(t: int) -> None:
    x = 3 * torch.randn(t, 72, generator=torch.Generator().manual_seed(t))      # large enough to clamp
    ids, weights = routing(t, 4, 8, seed=t)
    w13, w2, b13, b2 = experts(8, 72, 70, seed=3, bias=True)
    kw = dict(activation="gpt_oss", limit=1.5, alpha=1.702)
    out = triton_grouped_experts(x, ids, weights, w13, w2, b13, b2, **kw)
    torch.testing.assert_close(out, grouped_experts_reference(x, ids, weights, w13, w2, b13, b2, **kw),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["silu", "gpt_oss"])
def test_bf16_within_a_few_ulps(activation: str) -> None:
    x = torch.randn(21, 64, generator=torch.Generator().manual_seed(4))
    ids, weights = routing(21, 2, 6, seed=5)
    w13, w2, b13, b2 = experts(6, 64, 96, seed=6, bias=activation == "gpt_oss")
    limit = 7.0 if activation == "gpt_oss" else None
    expected = grouped_experts_reference(x, ids, weights, w13, w2, b13, b2, activation=activation, limit=limit)
    as16 = [None if w is None else w.to(torch.bfloat16) for w in (x, weights, w13, w2, b13, b2)]
    out = triton_grouped_experts(as16[0], ids, as16[1], *as16[2:], activation=activation, limit=limit)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=2e-2)


def test_int8_experts_equal_the_dequantized_ones() -> None:
    x = torch.randn(11, 64, generator=torch.Generator().manual_seed(7))
    ids, weights = routing(11, 2, 4, seed=8)
    w13, w2, _, _ = experts(4, 64, 48, seed=9)
    q13, s13 = (torch.stack(parts) for parts in zip(*(quantize_int8(w, torch.float32) for w in w13), strict=True))
    q2, s2 = (torch.stack(parts) for parts in zip(*(quantize_int8(w, torch.float32) for w in w2), strict=True))
    out = triton_grouped_experts(x, ids, weights, q13, q2, s13=s13, s2=s2)
    dequantized = grouped_experts_reference(x, ids, weights, q13.float() * s13[..., None], q2.float() * s2[..., None])
    torch.testing.assert_close(out, dequantized, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped_experts(x, ids, weights, q13, q2, s13=s13, s2=s2), dequantized,
                               atol=1e-5, rtol=1e-5)


def test_a_ranks_slice_of_the_experts_adds_up_to_all_of_them() -> None:
    x = torch.randn(19, 48, generator=torch.Generator().manual_seed(10))
    ids, weights = routing(19, 2, 8, seed=11)
    w13, w2, _, _ = experts(8, 48, 40, seed=12)
    shares = [triton_grouped_experts(x, ids, weights, w13[r * 4:(r + 1) * 4], w2[r * 4:(r + 1) * 4], first_expert=r * 4)
              for r in range(2)]
    cpu_shares = [grouped_experts(x, ids, weights, w13[r * 4:(r + 1) * 4], w2[r * 4:(r + 1) * 4], first_expert=r * 4)
                  for r in range(2)]
    expected = grouped_experts_reference(x, ids, weights, w13, w2)
    torch.testing.assert_close(shares[0] + shares[1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cpu_shares[0] + cpu_shares[1], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shares[0], expected, atol=1e-3)


def test_no_tokens() -> None:
    w13, w2, _, _ = experts(4, 48, 40, seed=0)
    out = triton_grouped_experts(torch.empty(0, 48), torch.empty(0, 2, dtype=torch.long), torch.empty(0, 2), w13, w2)
    assert out.shape == (0, 48)


@pytest.mark.parametrize(("t", "k", "num_experts", "first"), [(1, 1, 4, 0), (37, 4, 8, 0), (9, 2, 4, 4)])
def test_alignment_puts_each_pair_once_in_its_experts_block(t: int, k: int, num_experts: int, first: int) -> None:
    ids, _ = routing(t, k, 8, seed=t)
    block_m = choose_block_m(t * k, num_experts)
    aligned = align_pairs(ids, num_experts, block_m, first_expert=first)
    rows, blocks = aligned.sorted_ids.tolist(), aligned.block_expert.tolist()
    assert len(rows) == len(blocks) * block_m
    placed = [pair for pair in rows if pair < t * k]
    local = [p for p in range(t * k) if first <= int(ids.reshape(-1)[p]) < first + num_experts]
    assert sorted(placed) == local                                   # each held pair exactly once
    for row, pair in enumerate(rows):
        if pair < t * k:
            assert blocks[row // block_m] == int(ids.reshape(-1)[pair]) - first
    used = [b for b in blocks if b >= 0]
    assert used == sorted(used) and blocks[len(used):] == [-1] * (len(blocks) - len(used))
