"""The Triton programs behind ``triton_moe.triton_grouped_experts`` (imported only when triton is, on first use).

The (token, slot) pairs arrive sorted by expert in per-expert blocks of BLOCK_M rows (``sorted_ids``: the
pair index of each row, ``num_pairs`` on padding rows; ``block_expert``: each block's expert, -1 for a
block with no expert, which does nothing). One launch, ``moe_gate_up_kernel``, runs every block's tokens
through its expert's gate and up projections at once (two fp32 accumulators over the same columns), adds
the biases, applies the activation and writes the (rows, I) intermediate in the sorted order; a second,
``moe_down_kernel``, runs that through the experts' down projections, adds the bias, multiplies by the
router's weight and writes each pair's row (fp32) at the pair's own index, so the caller sums the k rows
of a token. int8 weights (``W_INT8``) are widened tile by tile in registers and their per-row scales applied
to the fp32 sums, as ``_triton_int8_kernel`` does.

Under triton's interpreter (``INTERPRETED``) the operands are widened to fp32 (``DOT_IN_FP32``): the
interpreter's ``tl.dot`` multiplies bf16 tensors by their raw bit patterns (see ``_triton_int8_kernel``).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

#: True when ``triton.jit`` below made an interpreted (CPU, numpy) function rather than a device kernel.
INTERPRETED: bool = bool(knobs.runtime.interpret)


@triton.jit
def moe_gate_up_kernel(
    out_ptr,                      # (rows, I): the activated intermediate, x's dtype, rows in sorted order
    x_ptr,                        # (T, H)
    w_ptr,                        # (E, 2I, H): gate rows then up rows; float or int8
    scales_ptr,                   # (E, 2I) when W_INT8, else any pointer
    bias_ptr,                     # (E, 2I) when HAS_BIAS, else any pointer
    sorted_ids_ptr,               # (rows,) int32
    block_expert_ptr,             # (rows // BLOCK_M,) int32
    num_pairs, top_k, inter, hidden,
    stride_x, stride_we, stride_wn, stride_se, stride_be, stride_o,
    limit, alpha,
    ACTIVATION: tl.constexpr,     # 0: silu(gate) * up; 1: GPT-OSS's clamped SwiGLU
    HAS_LIMIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    W_INT8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ids_ptr + rows)
        row_ok = pairs < num_pairs
        tokens = tl.where(row_ok, pairs // top_k, 0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + tokens.to(tl.int64)[:, None] * stride_x
        w_gate = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
        w_up = w_gate + inter * stride_wn

        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k_start in range(0, hidden, BLOCK_K):
            k = k_start + offs_k
            k_ok = k < hidden
            x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            g = tl.load(w_gate + k[:, None], mask=w_mask, other=0)
            u = tl.load(w_up + k[:, None], mask=w_mask, other=0)
            if DOT_IN_FP32:
                x = x.to(tl.float32)
                g = g.to(tl.float32)
                u = u.to(tl.float32)
            else:
                g = g.to(x.dtype)
                u = u.to(x.dtype)
            acc_gate = tl.dot(x, g, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(x, u, acc_up, input_precision=DOT_PRECISION)

        if W_INT8:
            scales = scales_ptr + expert.to(tl.int64) * stride_se + offs_n
            acc_gate = acc_gate * tl.load(scales, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_up = acc_up * tl.load(scales + inter, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            bias = bias_ptr + expert.to(tl.int64) * stride_be + offs_n
            acc_gate = acc_gate + tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_up = acc_up + tl.load(bias + inter, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION == 0:
            h = acc_gate * tl.sigmoid(acc_gate) * acc_up
        else:
            if HAS_LIMIT:
                acc_gate = tl.minimum(acc_gate, limit)
                acc_up = tl.minimum(tl.maximum(acc_up, -limit), limit)
            h = (acc_up + 1.0) * (acc_gate * tl.sigmoid(acc_gate * alpha))
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_o + offs_n[None, :],
                 h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_down_kernel(
    out_ptr,                      # (num_pairs, H) fp32: each pair's weighted expert output, at the pair's index
    h_ptr,                        # (rows, I): moe_gate_up_kernel's output
    w_ptr,                        # (E, H, I), float or int8
    scales_ptr,                   # (E, H) when W_INT8
    bias_ptr,                     # (E, H) when HAS_BIAS
    topk_weights_ptr,             # (num_pairs,)
    sorted_ids_ptr,
    block_expert_ptr,
    num_pairs, hidden, inter,
    stride_h, stride_we, stride_wn, stride_se, stride_be, stride_o,
    HAS_BIAS: tl.constexpr,
    W_INT8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ids_ptr + rows)
        row_ok = pairs < num_pairs
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden
        offs_k = tl.arange(0, BLOCK_K)
        h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
        w_cols = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn

        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k_start in range(0, inter, BLOCK_K):
            k = k_start + offs_k
            k_ok = k < inter
            h = tl.load(h_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
            if DOT_IN_FP32:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            else:
                w = w.to(h.dtype)
            acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)

        if W_INT8:
            scales = scales_ptr + expert.to(tl.int64) * stride_se + offs_n
            acc = acc * tl.load(scales, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            bias = bias_ptr + expert.to(tl.int64) * stride_be + offs_n
            acc = acc + tl.load(bias, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        routed = tl.load(topk_weights_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * routed[:, None]
        tl.store(out_ptr + pairs.to(tl.int64)[:, None] * stride_o + offs_n[None, :], acc,
                 mask=row_ok[:, None] & n_ok[None, :])


__all__ = ["INTERPRETED", "moe_down_kernel", "moe_gate_up_kernel"]
