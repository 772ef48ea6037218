"""bf16 linear layers whose weights are kept losslessly packed in ~12 bits a weight (``pack_bf16=True``).

Not a quantization: every weight keeps its exact bf16 value (``kernels.pack_bf16``: sign and mantissa in a
byte, the exponent as a 4-bit code within each row's window, the rare others listed whole), so a packed model
computes with the checkpoint's own numbers. What changes is the bytes a decode step streams from memory:
3/4 of them, where a batch-1 step on the CPU is bound by exactly that (benchmarks/RESULTS.md: InternVL2-1B's
decode 0.77x the time on an avx512_bf16 host). The price: steps of many rows (concurrent sequences,
compute-bound) unpack as they go, ~10-20% slower products at 16 rows; prefill unpacks each matrix per call.
So it is a choice (``load_model(pack_bf16=True)``, ``--pack-bf16``), for batch-1 / few-stream decoding.

``LayerPacker``: the loader's per-layer transform (as ``LayerQuantizer``): the language model's linear layers
with bf16 weights and ``in_features`` a multiple of 64 become ``PackedBf16Linear`` as soon as their weights
are in; the embeddings, norms, a tied LM head, the vision encoder and ``mlp1`` stay as they are. As the
quantizer, it packs from a read-only view of the checkpoint file where the loader can give one (a fused weight:
from its scratch mapping) and has the view's pages dropped as packing reads them, so a packed load's resident
memory is the packed weights, not those plus the bf16 pages read (InternVL2-1B: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..models.layers.moe import Router
from .linear import Release

logger = logging.getLogger(__name__)


class PackedBf16Linear(nn.Module):
    """``nn.Linear`` over bf16 weights kept packed (``kernels.pack_bf16``). Buffers: ``packed`` (the 1-D uint8
    blob), optional ``bias`` (N,). Up to ``KERNEL_MAX_ROWS`` rows the native kernel reads the packed weights
    (``kernels.linear_bf16_packed``); more rows (prefill) unpack the matrix for one ``F.linear``, which then
    gives exactly what the unpacked layer gives."""

    #: rows up to which the packed kernel runs (as the compute plan's bf16 kernels on the AVX-512 BF16 path)
    KERNEL_MAX_ROWS = 32

    packed: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = kernels.packed_bf16_shape(packed)
        self.register_buffer("packed", packed)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, release: Release | None = None) -> PackedBf16Linear:
        """Pack a CPU bf16 layer (``in_features`` a multiple of ``kernels.PACKED_BF16_COLUMNS``). ``release``: told
        of each row chunk of the weight once packing has read it (``kernels.pack_bf16``: the loader drops the file
        pages of a weight it hands over as a view of the checkpoint's mapping). The bias is copied: the layer's own
        may be such a view, or live in a scratch mapping freed with the layer."""
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(kernels.pack_bf16(linear.weight.detach(), release=release), bias)

    def unpacked_weight(self) -> torch.Tensor:
        """The (N, K) bf16 weight, bit for bit (a new tensor each call)."""
        return kernels.unpack_bf16(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if 0 < rows <= self.KERNEL_MAX_ROWS and x.dtype == torch.bfloat16:
            return kernels.linear_bf16_packed(x, self.packed, self.bias)
        return F.linear(x, self.unpacked_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        ratio = self.packed.numel() / (2 * self.in_features * self.out_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"packed bf16 ({ratio:.2f} of the bf16 bytes)")


def packable(module: nn.Module) -> bool:
    """Whether a layer can be packed where it lies on the CPU: a linear layer (not a mixture-of-experts router)
    with bf16 weights and ``in_features`` a multiple of ``kernels.PACKED_BF16_COLUMNS`` (a layer on the meta
    device, not loaded yet, answers for the layer it will be)."""
    return (isinstance(module, nn.Linear) and not isinstance(module, Router)
            and module.weight.dtype == torch.bfloat16 and module.weight.device.type in ("cpu", "meta")
            and module.in_features % kernels.PACKED_BF16_COLUMNS == 0)


class LayerPacker:
    """Packs the language model's linear layers one at a time, as the loader finishes each (``loading``).

    ``wants(name, module)``: an ``nn.Linear`` under ``language_model.`` (a tied LM head excluded: it is the
    embedding table). ``packs(name, module)``: wanted and packable, so that ``pack`` replaces it (the loader reads
    such a layer's weight from the checkpoint's mapping, ``release`` dropping its pages as packing reads them).
    ``pack(name, module, device)``: the packed layer, or None where the layer stays as it is (not packable, or not
    on the CPU). ``report()``: the log line, and {module name: "bf16 packed"}."""

    def __init__(self, tied_head: bool = False, *, release: Release | None = None) -> None:
        self.tied_head = tied_head
        self.release = release
        self.done: dict[str, str] = {}
        self.kept: list[str] = []
        self.bytes_before = 0
        self.bytes_after = 0

    def wants(self, name: str, module: nn.Module) -> bool:
        if not name.startswith("language_model.") or not isinstance(module, nn.Linear) or isinstance(module, Router):
            return False
        return not (self.tied_head and name.endswith("lm_head"))

    def packs(self, name: str, module: nn.Module) -> bool:
        return self.wants(name, module) and packable(module)

    def pack(self, name: str, module: nn.Module, device: torch.device) -> PackedBf16Linear | None:
        assert isinstance(module, nn.Linear), (name, type(module))
        if device.type != "cpu" or not packable(module):
            self.kept.append(name)
            return None
        layer = PackedBf16Linear.from_linear(module, release=self.release)
        self.done[name] = "bf16 packed"
        self.bytes_before += module.weight.numel() * 2
        self.bytes_after += layer.packed.numel()
        return layer

    def report(self) -> dict[str, str]:
        if self.done:
            logger.info("packed %d bf16 layers losslessly: %.0f MiB -> %.0f MiB (%.2f)%s", len(self.done),
                        self.bytes_before / 2**20, self.bytes_after / 2**20, self.bytes_after / self.bytes_before,
                        f"; kept as stored: {', '.join(self.kept)}" if self.kept else "")
        return self.done
