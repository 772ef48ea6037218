"""The native int4 weight layout: packing codes into it and back (pure torch, no native code).

Per row, each block of 32 columns is 16 bytes, byte j holding column j in its low nibble and column
16 + j in its high nibble (so one 16-byte load, split by nibble, gives the 32 columns in order). Scales
and zeros travel beside it as (N, K // group, 2) bf16, row-major, so each row streams its own
(``ops.linear_int4``, ``ops.dequantize_int4``).
"""

from __future__ import annotations

import torch

#: Columns per packed block (16 bytes).
INT4_BLOCK = 32


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in [0, 15] (any integer dtype; K a multiple of 32) -> (N, K // 2) uint8, native layout."""
    n, k = q.shape
    if k % INT4_BLOCK:
        raise ValueError(f"int4 packing needs K to be a multiple of {INT4_BLOCK}, got {k}")
    blocks = q.to(torch.uint8).reshape(n, k // INT4_BLOCK, 2, INT4_BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: (N, K // 2) uint8 -> codes (N, K) uint8."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // (INT4_BLOCK // 2), 1, INT4_BLOCK // 2)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(n, half * 2)
