"""Drop-in ``nn.Linear`` that sends decode-sized bf16 products to the native GEMV kernel.

``FastLinear`` *is* an ``nn.Linear`` (same parameters, state-dict keys and ``isinstance`` checks); only
``forward`` differs: a bf16 input on CPU with at most ``max_rows`` rows (decode: one row per sequence;
default 8 on hosts with native bf16 instructions, 16 elsewhere) goes to ``kernels.linear_bf16``;
everything else (prefill, float32, CUDA, autograd) to ``F.linear``.

Wiring it into a model, without copying any weight::

    from internvl_runtime.kernels.linear import FastLinear, fast_linear, patch_linear
    layer = FastLinear.from_linear(model.lm_head)        # shares the Parameters
    patch_linear(model.mlp.down_proj)                    # or: swap forward of an existing module
    y = fast_linear(x, fused_qkv_weight, fused_qkv_bias)  # functional form, for fused weights
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..hardware import cpu_has_fast_bf16
from . import linear_bf16

#: Rows (tokens x sequences) up to which the kernel is used. Where torch's bf16 GEMM has native bf16
#: instructions (avx512_bf16 / AMX) it matches the kernel at 8 rows and wins beyond (measured on Zen 4:
#: 4 rows kernel 1.3-1.8x faster, 8 rows about even, 16 rows torch ~1.7x faster); elsewhere (AVX2 hosts)
#: torch's bf16 path is ~100x slower than the kernel, so it takes up to 16 rows there too.
MAX_ROWS_FAST_BF16 = 8
MAX_ROWS = 16


@functools.lru_cache(maxsize=1)
def default_max_rows() -> int:
    """The row limit for this host (read lazily: importing this module reads nothing)."""
    return MAX_ROWS_FAST_BF16 if cpu_has_fast_bf16() else MAX_ROWS


def use_kernel(x: torch.Tensor, weight: torch.Tensor, max_rows: int | None = None) -> bool:
    """Whether ``fast_linear`` sends this product to the native kernel (cheap checks only)."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.dim() >= 1 and x.numel() <= (max_rows or default_max_rows()) * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                max_rows: int | None = None) -> torch.Tensor:
    """``F.linear`` with decode-sized bf16 CPU products on the native kernel (same result up to rounding)."""
    if use_kernel(x, weight, max_rows):
        return linear_bf16(x, weight, bias)
    return F.linear(x, weight, bias)


class FastLinear(nn.Linear):
    """``nn.Linear`` whose few-row bf16 CPU products run on the native GEMV kernel."""

    max_rows: int | None = None     # None: ``default_max_rows()``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernel(x, self.weight, self.max_rows):
            return linear_bf16(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, max_rows: int | None = None) -> FastLinear:
        """A FastLinear sharing ``linear``'s Parameters (no copy, no new memory)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features = linear.in_features
        new.out_features = linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.max_rows = max_rows
        return new


def _patched_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if use_kernel(x, self.weight):
        return linear_bf16(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def patch_linear(linear: nn.Linear) -> nn.Linear:
    """Make an existing ``nn.Linear`` use the kernel in place (its forward only); returns it."""
    linear.forward = types.MethodType(_patched_forward, linear)  # type: ignore[method-assign]
    return linear


def replace_linears(module: nn.Module, prefix: str = "") -> list[str]:
    """Swap every plain ``nn.Linear`` under ``module`` (name starting with ``prefix``) for a FastLinear
    sharing its weights; returns the names swapped. Subclasses (quantized layers) are left alone."""
    names = [name for name, child in module.named_modules()
             if type(child) is nn.Linear and name.startswith(prefix)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, FastLinear.from_linear(getattr(parent, attr)))
    return names
