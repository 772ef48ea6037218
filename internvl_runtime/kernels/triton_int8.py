"""Weight-only int8 matmul in Triton: ``int8_weight_matmul(x (M, K), weight int8 (N, K), scales (N,)) -> (M, N)``.

``y[m, n] = scales[n] * sum_k x[m, k] * weight[n, k]``: each program computes a (BLOCK_M, BLOCK_N) tile of y,
walking K in BLOCK_K steps; each step loads a tile of int8 codes (a quarter of the bytes of a 16-bit
weight: the point of int8 on a memory-bound decode step) and converts it to the activations' dtype in
registers (codes in [-127, 127] are exact in fp16, bf16 and fp32), one ``tl.dot`` accumulating in fp32;
the per-channel scale is applied once to the accumulator at the end (it factors out of the sum over K).
Never a dequantized copy of the weight in memory.

This module imports ``triton``: import it only where triton is installed (``quantization.linear`` checks
first); the package runs without it. Under ``TRITON_INTERPRET=1`` (read when this module is imported) the
kernel runs on CPU tensors, which is how the CPU test suite checks it against the dequantized product; the
interpreter's 16-bit conversions and dots are wrong (triton 3.9), so interpreted tiles are multiplied in
fp32: the CPU tests check the tiling, masks, strides and scaling, not the compiled 16-bit dot.

Tile sizes: a decode step (M <= 16) gets BLOCK_M = 16 (``tl.dot``'s minimum) and narrow N tiles, so a
4096-wide layer spreads over many programs; prefill gets 64 x 128 tiles. Not tuned on a GPU yet.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Triton's interpreter (3.9) converts int8 -> bf16 wrongly and gets bf16 ``tl.dot`` wrong: interpreted, the
#: tile product runs in fp32 (the same sums; only the compiled 16-bit dot is left unchecked on a CPU).
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _int8_weight_matmul_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,
                               stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)           # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None] * stride_wk,
                    mask=(offs_n[None, :] < N) & (k[:, None] < K), other=0)             # (BLOCK_K, BLOCK_N) int8
        if UPCAST:      # fp32 activations (no tf32), or the interpreter (see the module docstring)
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:           # the codes in x's dtype, exact (|code| <= 127); fp16/bf16 tensor-core dot, fp32 sums
            acc += tl.dot(x, w.to(x.dtype))
    scales = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    y = acc * scales[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def tile_sizes(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for ``m`` rows: decode-sized or prefill-sized tiles."""
    if m <= 16:
        return 16, 64, 128, 4
    if m <= 64:
        return 32, 128, 64, 4
    return 64, 128, 64, 8


def int8_weight_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) fp16/bf16/fp32, weight (N, K) int8, scales (N,) any float dtype -> (M, N) in x's dtype,
    accumulated in fp32 and scaled once before the one rounding to x's dtype."""
    if x.dim() != 2 or weight.dim() != 2 or scales.dim() != 1:
        raise ValueError(f"int8_weight_matmul takes x (M, K), weight (N, K), scales (N,); got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(scales.shape)}")
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or scales.shape[0] != n or weight.dtype != torch.int8 or x.dtype not in _DTYPES:
        raise ValueError(f"int8_weight_matmul: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} "
                         f"{weight.dtype}, scales {tuple(scales.shape)} do not fit")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    block_m, block_n, block_k, num_warps = tile_sizes(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_weight_matmul_kernel[grid](
        x, weight, scales, y, m, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=_INTERPRETED or x.dtype == torch.float32,
        num_warps=num_warps)
    return y
