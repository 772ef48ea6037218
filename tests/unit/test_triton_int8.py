"""int8 weight-only on CUDA with a real kernel: the backend each device gets (a pure function of the facts),
and the Triton kernel (``kernels.triton_int8``) run on CPU tensors under ``TRITON_INTERPRET=1`` against the
dequantized product, alone and through ``Int8Linear(backend="triton")``, never materialising a float weight."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from internvl_runtime.quantization import Int8Linear
from internvl_runtime.quantization.linear import choose_int8_backend, dequantize_int8, quantize_int8

pytest.importorskip("triton")

from internvl_runtime.kernels.triton_int8 import int8_weight_matmul  # after the skip: it needs triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize(("device_type", "cuda_kernel", "triton", "expected"), [
    ("cuda", True, True, "triton"),          # ours first: torch's CUDA int8 kernel is one thread per output
    ("cuda", True, False, "torch_cuda"),
    ("cuda", False, True, "triton"),
    ("cuda", False, False, "dequant"),
    ("cpu", True, True, "cpu"),              # the native GEMV / torch's CPU kernel, whatever CUDA has
    ("cpu", False, False, "cpu"),
    ("mps", True, True, "dequant"),
    ("meta", False, True, "dequant"),
])
def test_backend_follows_the_device_and_the_kernels_present(device_type: str, cuda_kernel: bool, triton: bool,
                                                            expected: str) -> None:
    assert choose_int8_backend(device_type, cuda_kernel=cuda_kernel, triton=triton) == expected


def quantized(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return quantize_int8(torch.randn(n, k, generator=generator) * 0.05, dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# (M, N, K): one row (decode), K and N not multiples of any tile, more rows than one M tile, a prefill tile
SHAPES = [(1, 7, 13), (1, 64, 256), (3, 70, 200), (17, 33, 96), (70, 130, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_kernel_matches_the_dequantized_product(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    q, scales = quantized(n, k, dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = int8_weight_matmul(x, q, scales)
    assert y.shape == (m, n) and y.dtype == dtype
    exact = x.float() @ dequantize_int8(q, scales).t()
    assert rel(y, exact) < TOLERANCE[dtype]


def test_kernel_reads_strided_activations_and_empty_sizes() -> None:
    q, scales = quantized(40, 48, torch.float32)
    x = torch.randn(48, 5)                       # x.t(): (5, 48) with strides (1, 5)
    exact = x.t() @ dequantize_int8(q, scales).t()
    assert rel(int8_weight_matmul(x.t(), q, scales), exact) < 1e-5
    assert int8_weight_matmul(torch.randn(0, 48), q, scales).shape == (0, 40)
    with pytest.raises(ValueError, match="do not fit"):
        int8_weight_matmul(torch.randn(2, 47), q, scales)


class FloatWeights(TorchDispatchMode):
    """Records every float tensor an operator returns that is as large as the weight (a dequantized copy)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.numel:
                self.seen.append(str(func))
        return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_on_the_triton_backend(dtype: torch.dtype, rows: int, bias: bool) -> None:
    n, k = 96, 80
    lin = torch.nn.Linear(k, n, bias=bias).to(dtype).requires_grad_(False)
    layer = Int8Linear.from_linear(lin, backend="triton")
    assert layer.backend == "triton" and layer.current_backend() == "triton"
    x = torch.randn(2, rows, k).to(dtype)
    with FloatWeights(n * k) as mode:
        y = layer(x)
    assert mode.seen == []                       # no dequantized weight, whatever the batch
    assert y.shape == (2, rows, n) and y.dtype == dtype
    exact = x.reshape(-1, k).float() @ dequantize_int8(layer.weight, layer.scales).t()
    if bias:
        exact = exact + lin.bias.float()
    assert rel(y.reshape(-1, n), exact) < TOLERANCE[dtype]

    dequantizing = Int8Linear(layer.weight, layer.scales, layer.bias, backend="dequant")
    with FloatWeights(n * k) as mode:
        dequantizing(x)
    assert mode.seen                             # the check sees a dequantized weight where there is one


def test_backend_is_chosen_once_and_follows_a_move() -> None:
    q, scales = quantized(8, 32, torch.float32)
    assert Int8Linear(q, scales, None).backend == "cpu"
    layer = Int8Linear(q, scales, None, backend="triton")
    assert layer.current_backend() == "triton"
    layer.to("meta")                             # moved to another device type: that device's backend
    assert layer.backend == "triton" and layer.current_backend() == "dequant"
    with pytest.raises(ValueError, match="backend"):
        Int8Linear(q, scales, None, backend="cuda")
