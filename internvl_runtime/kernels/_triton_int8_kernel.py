"""The Triton program behind ``triton_int8.int8_weight_matmul`` (imported only when triton is, on first use).

One program computes a BLOCK_M x BLOCK_N tile of ``x @ W.T`` for an int8 ``W`` (N, K): it walks K in
BLOCK_K steps, widening each int8 weight tile to the activation dtype in registers (exact: every code in
[-128, 127] is a bf16 / fp16 number) and accumulating in fp32; the per-row scale (and the bias) are
applied once, in fp32, before the one rounding to the output dtype. The dequantized weight never exists
in memory.

Under triton's interpreter (``TRITON_INTERPRET=1``, read by ``triton.jit`` when this module is imported;
``INTERPRETED``) the operands are widened to fp32 instead (``DOT_IN_FP32``): the interpreter's ``tl.dot``
multiplies bf16 tensors by their raw bit patterns, and casts int8 to bf16 by value into those bits. The
GPU computes the same numbers (bf16 x int8-as-bf16 products are exact in fp32, summed in fp32).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

#: True when ``triton.jit`` below made an interpreted (CPU, numpy) function rather than a device kernel.
INTERPRETED: bool = bool(knobs.runtime.interpret)


@triton.jit
def int8_weight_matmul_kernel(
    out_ptr,                      # (M, N), x's dtype
    x_ptr,                        # (M, K) bf16 / fp16 / fp32
    weight_ptr,                   # (N, K) int8
    scales_ptr,                   # (N,)
    bias_ptr,                     # (N,), or any pointer when not HAS_BIAS
    M, N, K,
    stride_x_m, stride_w_n, stride_o_m,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" where the operands are fp32, else None (the default)
    DOT_IN_FP32: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x_m               # (BLOCK_M, 1)
    w_cols = weight_ptr + offs_n.to(tl.int64)[None, :] * stride_w_n         # (1, BLOCK_N): W read transposed

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k = k_start + offs_k
        k_ok = k < K
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)   # (BLOCK_M, BLOCK_K)
        w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)     # (BLOCK_K, BLOCK_N)
        if DOT_IN_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    acc = acc * tl.load(scales_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_o_m + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


__all__ = ["INTERPRETED", "int8_weight_matmul_kernel"]
