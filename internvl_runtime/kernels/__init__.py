"""Native CPU operators for decode and the vision encoder, each with a torch fallback.

- ``ops.py``: the operators (GEMV over bf16 / float32 / int8 / int4 / packed bf16 weights as stored, int4
  dequantization, bf16 packing, vision
  attention, the fused decode step), native where a path runs, torch otherwise;
- ``extension.py``: loading the library once, and which instruction-set path runs (``INTERNVL_CPU_KERNEL``);
- ``build.py``: the just-in-time compile of ``csrc/`` under a build lock that cannot hang;
- ``packing.py``: the native int4 layout.

Use::

    from internvl_runtime import kernels
    y = kernels.linear_bf16(x, weight, bias)   # == F.linear(x, weight, bias), fp32 accumulation
    kernels.describe()                           # "avx512bf16: ..." or "torch: <why>"

This package knows operators only, never a model or a layer class. Importing it has no side effects:
nothing is read or compiled before the first call.
"""

from __future__ import annotations

from .build import BuildLockTimeout
from .extension import (
    ENV_VAR,
    PATHS,
    available,
    describe,
    has_operator,
    missing_flags,
    selected_path,
    supported_paths,
)
from .ops import (
    PACKED_BF16_COLUMNS,
    causal_attention,
    decode_layers,
    dequantize_int4,
    linear_bf16,
    linear_bf16_packed,
    linear_f32,
    linear_int4,
    linear_int8,
    pack_bf16,
    packed_bf16_shape,
    unpack_bf16,
    vision_attention,
)
from .packing import INT4_BLOCK, pack_int4, unpack_int4

__all__ = [
    "ENV_VAR",
    "INT4_BLOCK",
    "PACKED_BF16_COLUMNS",
    "PATHS",
    "BuildLockTimeout",
    "available",
    "causal_attention",
    "decode_layers",
    "dequantize_int4",
    "describe",
    "has_operator",
    "linear_bf16",
    "linear_bf16_packed",
    "linear_f32",
    "linear_int4",
    "linear_int8",
    "missing_flags",
    "pack_bf16",
    "pack_int4",
    "packed_bf16_shape",
    "selected_path",
    "supported_paths",
    "unpack_bf16",
    "unpack_int4",
    "vision_attention",
]
