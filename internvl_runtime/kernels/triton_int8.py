"""Weight-only int8 matrix product on the GPU in one Triton kernel: ``x @ (W * scales[:, None]).T (+ bias)``.

Why: the int8 layers (``quantization.Int8Linear``, ``W ~= q * scale[:, None]``) have no GPU kernel of
their own today; off the CPU they dequantize the whole weight into the activation dtype before one GEMM,
which reads the weight once as int8 and writes and reads it again twice as wide. This kernel reads the
int8 codes once and widens them tile by tile in registers; the scale (and the bias) are applied to the
fp32 sums, before the one rounding to ``x``'s dtype (so fp16 sums of raw codes never overflow).

Triton is optional: importing this module never imports it. ``int8_weight_matmul`` runs the kernel where
it can (a CUDA tensor, or any tensor under ``TRITON_INTERPRET=1``, which is how the tests run it on the
CPU) and ``int8_weight_matmul_reference`` (torch, same results up to rounding) elsewhere.

Use::

    from internvl_runtime.kernels.triton_int8 import int8_weight_matmul
    y = int8_weight_matmul(x, layer.weight, layer.scales, layer.bias)     # (..., K) -> (..., N)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _triton_support
from ._triton_support import KernelCall, triton_available

_KERNELS = "_triton_int8_kernel"


def kernel_runs_on(device: torch.device) -> bool:
    """Whether ``int8_weight_matmul`` runs the Triton kernel for tensors on ``device`` (else the reference)."""
    return _triton_support.runs_on(device, _KERNELS)


@dataclass(frozen=True)
class MatmulBlocks:
    """Tile sizes of one launch (powers of two >= 16, as ``tl.dot`` wants)."""

    block_m: int
    block_n: int
    block_k: int


def matmul_blocks(num_rows: int) -> MatmulBlocks:
    """Tiles from the number of rows alone: decode (a few rows) takes 16-row tiles, so that the weight,
    the cost that counts there, is read by as many programs in parallel as there are 64-column tiles;
    a prefill takes 64-row tiles, so each weight tile serves more rows."""
    block_m = 16 if num_rows <= 16 else 32 if num_rows <= 32 else 64
    return MatmulBlocks(block_m=block_m, block_n=64, block_k=64)


def _check(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Shapes and dtypes (metadata only): the callers are the layers, so these are invariants."""
    assert weight.dim() == 2 and weight.dtype == torch.int8, (weight.shape, weight.dtype)
    assert x.shape[-1] == weight.shape[1], (x.shape, weight.shape)
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    assert scales.shape == (weight.shape[0],) and scales.is_floating_point(), (scales.shape, scales.dtype)
    assert bias is None or (bias.shape == (weight.shape[0],) and bias.is_floating_point())


def int8_weight_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T + bias`` -> (..., N) in ``x``'s dtype.

    x (..., K) bf16 / fp16 (fp32 works too); weight (N, K) int8; scales (N,) and bias (N,) in any float
    dtype. fp32 accumulation, scale and bias in fp32, one rounding. Never dequantizes the whole weight
    (the reference fallback does, where the kernel cannot run).
    """
    _check(x, weight, scales, bias)
    if not kernel_runs_on(x.device) or x.numel() == 0 or weight.numel() == 0:     # (empty: nothing to launch)
        return int8_weight_matmul_reference(x, weight, scales, bias)
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    scales = scales.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    kernel = _triton_support.load(_KERNELS)
    int8_matmul_kernel_call(out, x2, weight, scales, bias, interpreted=kernel.INTERPRETED).launch(kernel)
    return out.reshape(*x.shape[:-1], n)


def int8_matmul_kernel_call(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                            bias: torch.Tensor | None, *, interpreted: bool) -> KernelCall:
    """The kernel launch ``int8_weight_matmul`` makes for ``out`` (M, N) = ``x`` (M, K) @ W.T (rows with a
    contiguous last dimension; M, N, K >= 1), as data. ``interpreted``: for triton's interpreter, whose
    ``tl.dot`` needs bf16 / fp16 operands widened."""
    (m, k), n = x.shape, weight.shape[0]
    widen = interpreted and x.dtype != torch.float32
    blocks = matmul_blocks(m)
    return KernelCall(
        kernel="int8_weight_matmul_kernel",
        grid=(-(-m // blocks.block_m), -(-n // blocks.block_n)),
        args=(out, x, weight, scales, bias if bias is not None else scales,   # any pointer when no bias
              m, n, k,
              x.stride(0), weight.stride(0), out.stride(0)),
        constants=dict(HAS_BIAS=bias is not None,
                       BLOCK_M=blocks.block_m,
                       BLOCK_N=blocks.block_n,
                       BLOCK_K=blocks.block_k,
                       DOT_PRECISION="ieee" if x.dtype == torch.float32 or widen else None,
                       DOT_IN_FP32=widen))


def int8_weight_matmul_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``int8_weight_matmul`` in torch, in fp32 (dequantizes the whole weight: tests and the fallback)."""
    _check(x, weight, scales, bias)
    out = F.linear(x.float(), weight.float()) * scales.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


__all__ = [
    "KernelCall",
    "MatmulBlocks",
    "int8_matmul_kernel_call",
    "int8_weight_matmul",
    "int8_weight_matmul_reference",
    "kernel_runs_on",
    "matmul_blocks",
    "triton_available",
]
