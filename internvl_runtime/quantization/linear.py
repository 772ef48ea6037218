"""Weight-only int8 / int4 linear layers over torch's own kernels (no extra library).

Why not a library: torchao 0.18 (the release beside torch 2.13) imports, but on CPU its int8
weight-only path ran slower than plain bf16 here and its int4 CPU path needs another package
(``mslk``); bitsandbytes is CUDA-first. torch itself ships the two kernels we need on CPU:
``aten._weight_int8pack_mm`` (int8 weights, one scale per output channel) and
``aten._weight_int4pack_mm_for_cpu`` (int4 weights, bf16 scale + zero per group: tinygemm's format),
plus ``aten._weight_int4pack_mm`` (tinygemm) on CUDA. int8 on CUDA runs our Triton kernel
(``kernels.triton_int8``) when triton is installed, else torch's ``_weight_int8pack_mm`` for CUDA
(``choose_int8_backend`` says why in that order); never a dequantized weight per call.

Formats (W is the float weight, (N, K) = (out_features, in_features)):
- int8: ``W ~= q * scale[:, None]``, q int8 in [-127, 127], scale = max|W row| / 127.
- int4: per group of ``group_size`` columns, ``W ~= (q - 8) * scale + zero``, q in [0, 15],
  scale = (max - min) / 15, zero = min + 8 * scale (scale and zero stored in bf16).

Kernel limits found on this torch (and worked around, each covered by a unit test):
- ``_weight_int8pack_mm`` with bf16 activations returns garbage or crashes when K % 16 != 0; with
  fp32 activations it is 10-60x slower than with bf16. So the kernel gets bf16 activations and only
  layers with K % 32 == 0 use it; others (and devices with no int8 kernel at all, neither CUDA nor
  CPU) dequantize the weight into the activation dtype and run one matmul (a temporary of one layer).
- Batches of more than ``Int8Linear.KERNEL_MAX_ROWS`` rows (prefill) also take the dequantizing path:
  the kernel is a matrix-vector routine and loses to one GEMM there. On CPUs without bf16
  instructions that GEMM runs in float32 (as the compute plan does for 16-bit layers).
- The int4 packers need N % 16 == 0: rows are zero-padded and the extra outputs dropped. The int4
  kernels take only bf16 activations and scales: other dtypes are converted around the call.
- The int4 layouts are device-specific (CPU: blocked by CPU vector width; CUDA: tinygemm tiles), so an
  int4 layer cannot change device type after packing (a clear error says to reload instead).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import UnsupportedFeature
from ..hardware import cpu_has_fast_bf16
from ..kernels import pack_int4
from ..kernels.triton_int8 import triton_available
from ..weights.mapping import streamed_empty

_ROW_CHUNK_ELEMS = 1 << 20          # float32 temporaries while quantizing: 4 MB per chunk (the rows are
#                                    independent: the chunking changes no value, only the peak at load)

#: ``release(rows)``: told of each row chunk of a float weight once the quantizer has read it for good (the
#: loader drops the file pages of a weight read from the checkpoint's mapping: ``weights.mapping.drop_pages``),
#: so a large weight (the LM head) is never resident whole while it is quantized.
Release = Callable[[torch.Tensor], object]


def _has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether this torch build registers ``aten::op`` for a dispatch key ("CPU", "CUDA")."""
    if not hasattr(torch.ops.aten, op):
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", dispatch_key))
    except (AttributeError, RuntimeError):  # private API moved: the op exists, assume it is there
        return True


#: The int8 backends: "cpu" (the native GEMV, else torch's ``_weight_int8pack_mm`` for CPU where it
#: exists; prefill-sized batches dequantize one layer and run one GEMM), "triton" (``kernels.triton_int8``:
#: dequantizes per K tile in registers), "torch_cuda" (torch's ``_weight_int8pack_mm`` for CUDA), "dequant"
#: (the weight converted and scaled, then one GEMM: devices with no kernel).
INT8_BACKENDS = ("cpu", "triton", "torch_cuda", "dequant")


def choose_int8_backend(device_type: str, *, cuda_kernel: bool, triton: bool) -> str:
    """The int8 backend for a device type, from the facts (a pure function: ``int8_backend`` gathers them:
    whether torch has ``_weight_int8pack_mm`` for CUDA, whether triton imports).

    CUDA prefers Triton over torch's own ``_weight_int8pack_mm``: torch's CUDA kernel (2.13) is one thread
    per output element in fp32, each thread walking its whole weight row alone (uncoalesced reads of the
    weight, no tensor cores; a real kernel, but a slow one at decode and far slower than a GEMM at prefill),
    so it is the fallback when triton is not installed. Never a dequantized weight per call where a kernel
    exists; "dequant" only for devices with neither. ``torch._int_mm`` (int8 x int8 -> int32) is not a
    candidate: it needs the activations quantized too (W8A8), which changes the numbers weight-only int8
    gives everywhere else."""
    if device_type == "cpu":
        return "cpu"
    if device_type == "cuda":
        if triton:
            return "triton"
        return "torch_cuda" if cuda_kernel else "dequant"
    return "dequant"


@functools.cache
def int8_backend(device_type: str) -> str:
    """The int8 backend for layers on ``device_type`` on this host (see ``choose_int8_backend``)."""
    return choose_int8_backend(device_type, cuda_kernel=_has_kernel("_weight_int8pack_mm", "CUDA"),
                               triton=device_type == "cuda" and triton_available())


@functools.cache
def _cpu_int8pack_kernel() -> bool:
    """Whether torch has its CPU int8 GEMV (``_weight_int8pack_mm``; the "cpu" backend's second choice)."""
    return _has_kernel("_weight_int8pack_mm", "CPU")


@functools.lru_cache(maxsize=1)
def _cpu_16bit_slow() -> bool:
    """16-bit GEMMs on this CPU are ~160x slower than float32 (no avx512_bf16/AMX): upcast prefill."""
    return not cpu_has_fast_bf16()


def _torch_at_least(version: str) -> bool:
    return torch.torch_version.TorchVersion(torch.__version__) >= version


def int4_backend(device: torch.device) -> str:
    """"cpu" or "cuda": the int4 kernel for ``device``; ``UnsupportedFeature`` where there is none."""
    if device.type == "cpu":
        if (_has_kernel("_weight_int4pack_mm_for_cpu", "CPU")
                and _has_kernel("_convert_weight_to_int4pack_for_cpu", "CPU")):
            return "cpu"
        raise UnsupportedFeature("4-bit weights need torch's CPU int4 kernel (_weight_int4pack_mm_for_cpu, "
                                 f"torch >= 2.5); torch {torch.__version__} has none: use load_in_8bit=True or a "
                                 "newer torch")
    if device.type == "cuda":
        if not (_torch_at_least("2.5") and _has_kernel("_weight_int4pack_mm", "CUDA")):
            raise UnsupportedFeature(f"4-bit weights on CUDA need torch >= 2.5 built with the tinygemm int4 kernel; "
                                     f"torch {torch.__version__} lacks it: use load_in_8bit=True")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise UnsupportedFeature(f"4-bit weights on {device} need compute capability 8.0+ (tinygemm); this GPU "
                                     f"is {major}.{minor}: use load_in_8bit=True")
        return "cuda"
    raise UnsupportedFeature(f"no 4-bit kernel for device type {device.type!r} (CPU and CUDA only); "
                             f"use load_in_8bit=True")


def _row_chunks(num_rows: int, row_len: int, multiple: int = 1) -> list[tuple[int, int]]:
    step = max(multiple, (_ROW_CHUNK_ELEMS // max(row_len, 1)) // multiple * multiple)
    return [(start, min(start + step, num_rows)) for start in range(0, num_rows, step)]


# ---- quantizers (pure functions, float32 math, row chunk by row chunk) ----------------------------
def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16, *,
                  release: Release | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int8, scales (N,) ``scale_dtype``; W ~= q * scales[:, None]. ``release``: told
    of each row chunk of ``weight`` once read (see ``Release``)."""
    n, k = weight.shape
    q = streamed_empty((n, k), torch.int8, weight.device)
    scales = torch.empty(n, dtype=scale_dtype, device=weight.device)
    for start, end in _row_chunks(n, k):
        w = weight[start:end].float()
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(scale_dtype)  # rounded as stored
        scales[start:end] = scale
        q[start:end] = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        if release is not None:
            release(weight[start:end])
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight an int8 layer computes with."""
    return q.float() * scales.float()[:, None]


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int32 in [0, 15], scales_and_zeros (K // group_size, N, 2) bf16.

    W ~= (q - 8) * scale + zero per group (tinygemm's convention); q is computed against the
    bf16-rounded scale and zero actually stored."""
    n, k = weight.shape
    assert k % group_size == 0, (k, group_size)
    groups = k // group_size
    q = torch.empty((n, k), dtype=torch.int32, device=weight.device)
    scales_and_zeros = torch.empty((groups, n, 2), dtype=torch.bfloat16, device=weight.device)
    for start, end in _row_chunks(n, k):
        w = weight[start:end].float().reshape(end - start, groups, group_size)
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scale = torch.where(high > low, (high - low) / 15, torch.ones_like(high)).to(torch.bfloat16)
        zero = (low + 8 * scale.float()).to(torch.bfloat16)
        scales_and_zeros[:, start:end, 0] = scale.t()
        scales_and_zeros[:, start:end, 1] = zero.t()
        codes = torch.round((w - zero.float()[..., None]) / scale.float()[..., None]) + 8
        q[start:end] = codes.clamp_(0, 15).reshape(end - start, k).to(torch.int32)
    return q, scales_and_zeros


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight an int4 layer computes with (q: (N, K) codes before packing)."""
    n, k = q.shape
    sz = scales_and_zeros.float()[:, :n]                                  # (G, N, 2)
    w = (q.float().reshape(n, k // group_size, group_size) - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
    return w.reshape(n, k)


# ---- modules -------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights (one scale per output channel). Buffers: ``weight`` (N, K)
    int8, ``scales`` (N,), optional ``bias`` (N,) in the model dtype. Output in the input's dtype.

    ``backend`` (one of ``INT8_BACKENDS``) is chosen once, at construction, from the weight's device
    (``int8_backend``), or given; a layer moved to another device type afterwards (``model.cuda()``) uses
    that device's backend."""

    #: Rows (tokens) up to which the CPU GEMV kernel is used; above, one dequantized GEMM is faster (the
    #: kernel's cost grows per row, the dequantizing path's is mostly fixed; ``benchmarks/gemv.py`` finds
    #: where they cross on a host, kept below that with a margin).
    KERNEL_MAX_ROWS = 16

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *,
                 backend: str | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)
        self.kernel_ok = self.in_features % 32 == 0     # see the module docstring (K % 16 bug)
        if backend is not None and backend not in INT8_BACKENDS:
            raise ValueError(f"int8 backend must be one of {INT8_BACKENDS}, got {backend!r}")
        self.backend = backend or int8_backend(weight.device.type)
        self._backend_device_type = weight.device.type

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device | None = None, *,
                    backend: str | None = None, release: Release | None = None) -> Int8Linear:
        """Quantize on the weight's current device, then move the result to ``device``. ``release``: told of
        each row chunk of the float weight once read (see ``Release``)."""
        device = torch.device(device or linear.weight.device)
        backend = backend or int8_backend(device.type)
        scale_dtype = torch.bfloat16 if backend == "cpu" and _cpu_int8pack_kernel() else linear.weight.dtype
        q, scales = quantize_int8(linear.weight.detach(), scale_dtype, release=release)
        bias = linear.bias.detach().to(device) if linear.bias is not None else None
        return cls(q.to(device), scales.to(device), bias, backend=backend)

    def current_backend(self) -> str:
        """The backend for where the weight is now: the one chosen at construction, unless moved since."""
        device_type = self.weight.device.type
        return self.backend if device_type == self._backend_device_type else int8_backend(device_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        backend = self.current_backend()
        if backend == "triton":
            from ..kernels.triton_int8 import int8_weight_matmul  # triton is imported only here

            y = int8_weight_matmul(x2.contiguous(), self.weight, self.scales)
        elif backend == "torch_cuda":
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.scales).to(x.dtype)
        elif 0 < x2.shape[0] <= self.KERNEL_MAX_ROWS and backend == "cpu" and _native_kernels():
            # the native GEMV: weights streamed as stored, fp32 accumulation, scale and bias applied before
            # the one rounding (the fused decode step computes exactly this)
            return kernels.linear_int8(x2, self.weight, self.scales, self.bias).reshape(
                *x.shape[:-1], self.out_features)
        elif (self.kernel_ok and 0 < x2.shape[0] <= self.KERNEL_MAX_ROWS and backend == "cpu"
              and _cpu_int8pack_kernel()):
            scales = self.scales if self.scales.dtype == torch.bfloat16 else self.scales.to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight, scales)
            y = y.to(x.dtype)
        else:
            # dequantize the weight (scaled first: fp16 sums of raw codes could overflow) and one GEMM; scaled in
            # place (the same products, rounded once as ``a * b`` rounds them): one temporary of the layer, not two
            dtype = torch.float32 if x.device.type == "cpu" and _cpu_16bit_slow() else x.dtype
            weight = self.weight.to(dtype).mul_(self.scales.to(dtype)[:, None])
            y = F.linear(x2.to(dtype), weight).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8, backend={self.backend}")


def _native_kernels() -> bool:
    """Whether the native CPU kernels (``internvl_runtime.kernels``) run on this host."""
    try:
        return kernels.available()
    except UnsupportedFeature:        # a forced path this CPU lacks: torch's kernels instead
        return False


def _native_int4_kernel(device: torch.device, group_size: int) -> bool:
    """Whether int4 layers on ``device`` use the native CPU kernel (``kernels.linear_int4``)."""
    return device.type == "cpu" and group_size % 32 == 0 and _native_kernels()


class Int4Linear(nn.Module):
    """``nn.Linear`` with int4 weights, asymmetric per group of ``group_size`` input columns.

    Buffers depend on ``backend``:
    - "native" (CPU with the native kernels): ``weight`` (N, K/2) uint8 in ``kernels.pack_int4``'s layout,
      ``scales_and_zeros`` (N, K // group_size, 2) bf16 (each row's groups together, as the kernel streams
      them). Few-row products (decode) run ``kernels.linear_int4``; more rows dequantize the layer to the
      compute dtype and run one GEMM.
    - "cpu" / "cuda" (torch's kernels): ``weight`` packed for that kernel (N padded to 16),
      ``scales_and_zeros`` (K // group_size, N_padded, 2) bf16.
    ``bias`` (N,) in the model dtype, optional. ``group_scales_and_zeros()`` gives (G, N, 2) for any backend.
    """

    #: Rows up to which the native kernel runs (above, dequantize + GEMM: prefill).
    KERNEL_MAX_ROWS = 16

    weight: torch.Tensor
    scales_and_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None, *,
                 in_features: int, out_features: int, group_size: int, backend: str) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.backend = backend
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", bias)

    @staticmethod
    def supports(in_features: int, group_size: int) -> bool:
        return in_features % group_size == 0

    def group_scales_and_zeros(self) -> torch.Tensor:
        """(K // group_size, N, 2) bf16 scale and zero of every group, whatever the layout."""
        if self.backend == "native":
            return self.scales_and_zeros.permute(1, 0, 2)
        return self.scales_and_zeros[:, : self.out_features]

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, device: torch.device | None = None, *,
                    release: Release | None = None) -> Int4Linear:
        """Quantize and pack for ``device`` (whose int4 kernel must exist: see ``int4_backend``). ``release``:
        told of each row chunk of the float weight once read (see ``Release``; the native layout's path)."""
        device = device or linear.weight.device
        backend = int4_backend(device)
        n, k = linear.weight.shape
        if k % group_size:
            raise UnsupportedFeature(f"int4 group size {group_size} does not divide in_features {k}")
        bias = linear.bias.detach().to(device) if linear.bias is not None else None
        if backend == "cpu" and _native_int4_kernel(torch.device(device), group_size):
            packed = streamed_empty((n, k // 2), torch.uint8, device)
            scales_and_zeros = torch.empty((n, k // group_size, 2), dtype=torch.bfloat16, device=device)
            for start, end in _row_chunks(n, k):
                q, sz = quantize_int4(linear.weight.detach()[start:end], group_size)
                packed[start:end] = pack_int4(q)
                scales_and_zeros[start:end] = sz.permute(1, 0, 2)
                if release is not None:
                    release(linear.weight.detach()[start:end])
            return cls(packed, scales_and_zeros, bias, in_features=k, out_features=n, group_size=group_size,
                       backend="native")
        padded = -(-n // 16) * 16
        weight = linear.weight.detach()
        if padded != n:
            weight = torch.cat([weight, weight.new_zeros((padded - n, k))])
        packed_rows = []
        scales_and_zeros = torch.empty((k // group_size, padded, 2), dtype=torch.bfloat16, device=device)
        for start, end in _row_chunks(padded, k, multiple=256):  # CPU packing is row-block local (tested)
            q, sz = quantize_int4(weight[start:end], group_size)
            scales_and_zeros[:, start:end] = sz.to(device)
            if backend == "cpu":
                packed_rows.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.cpu(), 1))
            else:                                               # tinygemm takes (N, K/2) uint8, even k high
                packed_rows.append(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8))   # stays on the weight's device
            del q
        packed = torch.cat(packed_rows) if len(packed_rows) > 1 else packed_rows[0]
        if backend == "cuda":
            inner_k_tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack(packed.to(device), inner_k_tiles)
        return cls(packed.to(device), scales_and_zeros, bias, in_features=k, out_features=n,
                   group_size=group_size, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = "cpu" if self.backend == "native" else self.backend
        if self.weight.device.type != device_type:
            raise UnsupportedFeature(f"this int4 layer was packed for {self.backend} and cannot run on "
                                     f"{self.weight.device}; load the model again with the device you want")
        if self.backend == "native":
            return self._forward_native(x)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if x2.shape[0] == 0:
            return x.new_empty((*x.shape[:-1], self.out_features))
        sz = self.scales_and_zeros
        if sz.dtype != torch.bfloat16:
            sz = sz.to(torch.bfloat16)
        if self.backend == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, self.group_size, sz)
        if y.shape[1] != self.out_features:
            y = y[:, : self.out_features]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _forward_native(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if 0 < x2.shape[0] <= self.KERNEL_MAX_ROWS:
            y = kernels.linear_int4(x2, self.weight, self.scales_and_zeros, self.group_size, self.bias)
        else:   # prefill: one layer dequantized to the compute dtype, then one GEMM
            dtype = torch.float32 if x.dtype == torch.float32 or _cpu_16bit_slow() else x.dtype
            weight = kernels.dequantize_int4(self.weight, self.scales_and_zeros, self.group_size, dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            y = F.linear(x2.to(dtype), weight, bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4 group_size={self.group_size}, backend={self.backend}")
