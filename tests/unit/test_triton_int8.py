"""The Triton weight-only int8 matmul (``kernels.triton_int8.int8_weight_matmul``), run on CPU tensors by
triton's interpreter, against ``x @ (weight * scales[:, None]).T (+ bias)`` computed in float32.

Shapes are awkward on purpose: rows, columns and the inner size are not multiples of the kernel's tiles
(16/64 rows, 64 columns, 64 inner), so every edge mask is exercised; one row (decode) and many (prefill).

Tolerances, against float32 (outputs are O(1): unit-normal x times a weight of rows with unit norm):
float32 1e-5; bfloat16 2e-2 absolute + 1e-2 relative (the one rounding of the output to bf16: up to one
ulp, 2^-7 relative, as the interpreter rounds toward zero); float16 5e-3 absolute + 2e-3 relative.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is defined: before it is imported

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from internvl_runtime.kernels.triton_int8 import (
    int8_weight_matmul,
    int8_weight_matmul_reference,
    kernel_runs_on,
    matmul_blocks,
)

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (5e-3, 2e-3)}


def quantized(n: int, k: int, seed: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 weight (N, K) and its per-row scales, as ``quantization.quantize_int8`` makes them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    scales = w.abs().amax(dim=1) / 127
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales.to(scale_dtype)


def expected(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.float() @ (weight.float() * scales.float()[:, None]).T
    return out + bias.float() if bias is not None else out


def test_the_kernel_runs_under_the_interpreter() -> None:
    assert kernel_runs_on(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 96, 80), (5, 130, 129), (40, 64, 64), (100, 33, 17)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_the_dequantized_product(dtype: torch.dtype, m: int, n: int, k: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    weight, scales = quantized(n, k, seed=n + k, scale_dtype=dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    out = int8_weight_matmul(x, weight, scales, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected(x, weight, scales, bias), atol=atol, rtol=rtol)
    torch.testing.assert_close(out, int8_weight_matmul_reference(x, weight, scales, bias), atol=atol, rtol=rtol)


def test_leading_dimensions_strided_input_and_fp32_scales() -> None:
    weight, scales = quantized(70, 48, seed=1, scale_dtype=torch.float32)
    wide = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x = wide[..., ::2]                                           # (2, 3, 48), last stride 2
    out = int8_weight_matmul(x, weight, scales)
    assert out.shape == (2, 3, 70)
    torch.testing.assert_close(out.float(), expected(x, weight, scales, None), atol=2e-2, rtol=1e-2)


def test_large_codes_do_not_overflow_in_fp16() -> None:
    # Sums of raw codes (127 * 127 * K) exceed fp16's range: the kernel scales the fp32 sums instead.
    weight = torch.full((16, 256), 127, dtype=torch.int8)
    scales = torch.full((16,), 1e-3, dtype=torch.float16)
    x = torch.full((3, 256), 100.0, dtype=torch.float16)
    out = int8_weight_matmul(x, weight, scales)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected(x, weight, scales, None), atol=0, rtol=2e-3)


@pytest.mark.parametrize(("rows", "block_m"), [(1, 16), (16, 16), (17, 32), (32, 32), (33, 64), (4096, 64)])
def test_matmul_blocks(rows: int, block_m: int) -> None:
    blocks = matmul_blocks(rows)
    assert (blocks.block_m, blocks.block_n, blocks.block_k) == (block_m, 64, 64)


_WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None          # as if triton were not installed
import torch
from internvl_runtime.kernels import triton_int8
assert not triton_int8.triton_available() and not triton_int8.kernel_runs_on(torch.device("cpu"))
x, w, s = torch.randn(3, 8), torch.randint(-127, 128, (5, 8), dtype=torch.int8), torch.rand(5)
torch.testing.assert_close(triton_int8.int8_weight_matmul(x, w, s), x @ (w.float() * s[:, None]).T)
print("ok")
"""


def test_without_triton_the_module_imports_and_falls_back_to_the_reference() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
