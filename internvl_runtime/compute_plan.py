"""A compute plan per host: for each part of the model, the fastest correct way to compute.

Chosen once at load from what the CPU has (``hardware.cpu_flags``) and the weights' dtype, logged in one
line and shown by ``internvl info``. ``INTERNVL_COMPUTE=native|upcast`` forces the 16-bit handling and
``INTERNVL_CPU_KERNEL=torch|avx2|avx512|avx512bf16`` the decode kernel (for tests and benchmarks).

Parts:
- vision encoder and prefill (compute-bound): native 16-bit matmuls where the CPU has bf16/fp16
  instructions, else float32 computed from the 16-bit weights layer by layer ("upcast");
- decode matrix-vector products and the LM head (bandwidth-bound): a CPU kernel that streams the stored
  16-bit (or, in a float32 model, float32) weights when one is available for this host, else torch;
- attention: SDPA for prefill and the vision encoder, two small matmuls per layer for decode.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch

from . import kernels
from .decode_stack import DecodeStack
from .errors import InvalidRequest
from .hardware import cpu_has_fast_bf16
from .models.decoders.base import DecoderForCausalLM
from .models.internvl import InternVLModel
from .models.layers.linear import LinearPlan, set_linear_plan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComputePlan:
    dtype: torch.dtype
    device: str
    upcast_16bit: bool
    decode_kernel: str       # "torch" or the kernel's ISA path
    decode_layers: str = "python"   # "native" (one C++ call per step) or "python (<why not>)"

    def describe(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        heavy = "float32 from 16-bit weights (upcast per layer)" if self.upcast_16bit else f"native {dt}"
        return (f"compute plan: weights {dt} on {self.device}; vision+prefill: {heavy}; "
                f"decode GEMV/LM head: {self.decode_kernel}; decode layers: {self.decode_layers}; "
                f"attention: {self._attention()}")

    def _attention(self) -> str:
        native_vision = (self.decode_kernel.startswith("avx512bf16") and not self.upcast_16bit
                         and self.dtype == torch.bfloat16)
        vision = "native kernel" if native_vision else "SDPA"
        decode = "in the decode layers" if self.decode_layers.startswith("native") else "GQA matmuls"
        return f"vision {vision}, prefill SDPA, decode {decode}"


def _decode_kernel(dtype: torch.dtype):
    """(name, callable or None) of the small-row kernel for this host and weight dtype, if the kernels
    package offers one: bf16 and float32 weights have one on every native path."""
    if dtype not in (torch.bfloat16, torch.float32) or not kernels.available():
        return "torch", None
    if dtype == torch.float32:
        # every AVX-512 path runs the AVX-512F fp32 tile: no 16-bit arithmetic is involved
        tile = "AVX2+FMA" if kernels.selected_path() == "avx2" else "AVX-512F"
        return f"{kernels.describe()}; float32 weights: the {tile} fp32 GEMV", kernels.linear_f32
    return kernels.describe(), kernels.linear_bf16


def choose_plan(dtype: torch.dtype, device: torch.device | str) -> ComputePlan:
    device = torch.device(device)
    forced = os.environ.get("INTERNVL_COMPUTE", "auto")
    if forced not in ("auto", "native", "upcast"):
        raise InvalidRequest(f"INTERNVL_COMPUTE={forced!r}: use auto, native or upcast")
    sixteen = dtype in (torch.bfloat16, torch.float16)
    if device.type != "cpu":
        return ComputePlan(dtype, str(device), False, "torch")
    upcast = sixteen and (forced == "upcast" or (forced == "auto" and not cpu_has_fast_bf16()))
    name, _ = _decode_kernel(dtype)
    return ComputePlan(dtype, str(device), upcast, name, _expected_decode_layers(dtype, name))


def _expected_decode_layers(dtype: torch.dtype, kernel: str) -> str:
    """What ``apply_plan`` will give a model's decode layers, as far as it is known before the model is
    (``internvl info``): the native stack needs a native kernel, the operator and bf16 or float32 weights."""
    if kernel == "torch":
        return "python (no native kernel)"
    if dtype not in (torch.bfloat16, torch.float32):
        return f"python (weights are {dtype})"
    if not kernels.has_operator("decode_layers"):
        return "python (the native library lacks decode_layers)"
    return "native where the model's layers fit it (decided at load)"


def apply_plan(model: InternVLModel, plan: ComputePlan) -> None:
    """Hand the plan to the model's parts through their own setters: the Linear layers (small-row kernel,
    upcast), the vision encoder (upcast patch embedding), the decoder (native decode stack)."""
    _, kernel = _decode_kernel(plan.dtype) if plan.decode_kernel != "torch" else ("torch", None)
    # the upcast plan (forced, or a CPU without bf16 instructions) keeps torch's bf16 GEMM out of decode
    # (INTERNVL_COMPUTE=upcast on an avx512_bf16 host thus reproduces an AVX2 host's plan)
    fast_16bit = cpu_has_fast_bf16() and not plan.upcast_16bit
    # torch's GEMM is fast in the model's dtype: float32 everywhere, 16-bit where the CPU has the instructions
    fast_gemm = fast_16bit or plan.dtype == torch.float32
    # the bf16 kernel of the AVX-512 BF16 path has its multi-row tile (vdpbf16ps, 8 x 2 / 6 x 4 / 8 x 3 rows x
    # weight rows), ahead of oneDNN's bf16 GEMM from 5 rows to 16 (RESULTS.md, issue #18 batched decode)
    multi_row = (kernel is not None and plan.dtype == torch.bfloat16 and not plan.upcast_16bit
                 and plan.decode_kernel.startswith("avx512bf16"))
    linear_plan = None
    if plan.upcast_16bit or kernel is not None:
        # The GEMV kernel wins at a few rows where torch has fast GEMMs in the dtype, up to 16 elsewhere (torch's
        # bf16 is far slower there), up to MULTI_ROW_KERNEL_ROWS with the multi-row tile: benchmarks/gemv.py
        # measures the crossing, benchmarks/RESULTS.md has runs.
        rows = MULTI_ROW_KERNEL_ROWS if multi_row else 4 if fast_gemm else 16
        linear_plan = LinearPlan(upcast=plan.upcast_16bit, small_row_kernel=kernel, max_kernel_rows=rows)
    set_linear_plan(model, linear_plan)
    model.vision_model.set_upcast_16bit(plan.upcast_16bit)
    plan = _plan_decode_layers(model.language_model, plan, *decode_stack_rows(fast_gemm, multi_row))
    model.set_compute_plan(plan)
    logger.info(plan.describe())


#: Decode steps of up to this many sequences run in the native stack: in practice all of them.
MAX_NATIVE_DECODE_ROWS = 4096

#: Rows up to which the bf16 products stay on the kernels where they have the multi-row tile (AVX-512 BF16):
#: measured ahead of oneDNN up to 16 rows; 32 keeps a full 16-sequence batch and a short prompt on them.
MULTI_ROW_KERNEL_ROWS = 32


def decode_stack_rows(fast_gemm: bool, multi_row: bool = False) -> tuple[int, int]:
    """(most sequences a native decode step takes, sequences from which its products run on torch's GEMM
    instead of the GEMV kernels; 0: never), where torch's GEMM is fast in the model's dtype or not (16-bit:
    a CPU with or without bf16 instructions; float32: fast on every host, so as a bf16 CPU's).

    The native stack takes every decode step: besides the products it removes the Python layer loop
    (~350 tensor operations per step), so it wins at any row count once its products are as fast as the
    Python path's. Those are the GEMV kernels (each weight row read once for all rows) up to 4 rows where
    the CPU has bf16 instructions and torch's GEMM from 5 (at 8 rows the kernels ran at ~60% of torch's
    oneDNN GEMM, at 16 ~50%: benchmarks/gemv.py, RESULTS.md); without them torch's bf16 is ~100x slower
    than the kernels, which then take every row count (an AVX2 host: the Python path would convert the
    weights to float32 per call). Where the bf16 kernel has its multi-row tile (``multi_row``: AVX-512 BF16,
    bf16 weights) the kernels keep the products up to ``MULTI_ROW_KERNEL_ROWS`` sequences."""
    if multi_row:
        return MAX_NATIVE_DECODE_ROWS, MULTI_ROW_KERNEL_ROWS + 1
    return MAX_NATIVE_DECODE_ROWS, (5 if fast_gemm else 0)


def _plan_decode_layers(lm: DecoderForCausalLM, plan: ComputePlan, rows: int, gemm_rows: int) -> ComputePlan:
    """Give the language model a native decode stack where one applies; the plan records which."""
    lm.set_decode_stack(None)
    if plan.decode_kernel == "torch" or plan.dtype not in (torch.bfloat16, torch.float32):
        why = "no native kernel" if plan.decode_kernel == "torch" else f"weights are {plan.dtype}"
        return replace(plan, decode_layers=f"python ({why})")
    stack = DecodeStack.build(lm, gemm_rows)
    if isinstance(stack, str):
        return replace(plan, decode_layers=f"python ({stack})")
    lm.set_decode_stack(stack, rows)
    dt = str(plan.dtype).removeprefix("torch.")
    gemm = f"; {dt} products on torch's GEMM from {gemm_rows} sequences" if gemm_rows else ""
    return replace(plan, decode_layers=f"native (up to {rows} sequences{gemm})")
