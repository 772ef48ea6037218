"""``LayerQuantizer``: one linear layer -> its int8 / int4 layer (the loader calls it per layer as the
layer's weights arrive); ``quantize_model``: the same over a loaded model, one layer at a time.

What is quantized: every ``nn.Linear`` under ``language_model`` (q/k/v, o, gate/up, down and the LM
head) and every stack of experts (``StackedExperts`` -> ``QuantizedExperts``, per expert in the same
format); never the embeddings, the norms or a mixture-of-experts router (``Router``). The vision
encoder and ``mlp1`` only with ``include_vision`` (a ``UserWarning`` says why that is risky). Peak memory
stays at the loaded model plus one layer's temporaries: each layer is quantized, moved to its target
device and its float weight dropped before the next one starts (only module *names* are collected up
front, so no stale reference keeps a float weight alive).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..models.layers.moe import Router, StackedExperts
from .config import INT4_GROUP_SIZES, QuantizationConfig
from .experts import QuantizedExperts
from .linear import Int4Linear, Int8Linear, Release, int4_backend

logger = logging.getLogger(__name__)

VISION_WARNING = ("quantizing the vision encoder too (include_vision=True): the official InternVL2 model card "
                  "warns that 4-bit quantization of the 6B InternViT gives wrong outputs; expect larger errors "
                  "in image features than in the LLM")


def _int4_group(in_features: int, wanted: int) -> int | None:
    """The requested group size if it divides K, else the largest smaller one that does (or None)."""
    for size in sorted(INT4_GROUP_SIZES, reverse=True):
        if size <= wanted and in_features % size == 0:
            return size
    return None


def quantizable(module: nn.Module) -> bool:
    """Whether a module is of a kind that quantization replaces (a linear layer other than a mixture-of-
    experts router, or a stack of experts); where it must sit for that is ``LayerQuantizer.wants``'s."""
    return isinstance(module, (nn.Linear, StackedExperts)) and not isinstance(module, Router)


class LayerQuantizer:
    """Quantizes linear layers one at a time: ``quantize_model`` over a loaded model, and the loader
    (``loading``) for each layer as soon as its weights are in, on the layer's own device.

    ``wants(name, module)``: whether the module is one to quantize (an ``nn.Linear`` other than a router,
    or a ``StackedExperts``, under ``language_model``, or under the vision encoder / ``mlp1`` too with
    ``include_vision``). ``quantize(name, module, device)``: the int8 / int4 layer for ``device``.
    ``report()``: the log lines and {module name: what it became}, once all are done; it also hands freed
    memory back to the OS. ``release``: told of each row chunk of a float weight once read (``linear.Release``:
    the loader drops the file pages of weights it hands over as views of the checkpoint's mapping)."""

    def __init__(self, config: QuantizationConfig, include_vision: bool | None = None, *,
                 release: Release | None = None) -> None:
        self.config = config
        self.release = release
        self._since_trim = 0                      # float weight bytes quantized since freed memory was last returned
        self.include_vision = config.include_vision if include_vision is None else include_vision
        if self.include_vision:
            warnings.warn(VISION_WARNING, UserWarning, stacklevel=3)
        self.prefixes = ("language_model.", "vision_model.", "mlp1.") if self.include_vision else ("language_model.",)
        self.done: dict[str, str] = {}
        self.fallbacks: list[str] = []

    def wants(self, name: str, module: nn.Module) -> bool:
        return quantizable(module) and name.startswith(self.prefixes)

    #: Float weight bytes quantized between two returns of freed memory to the OS while loading. The quantizer's
    #: row-chunk temporaries are carved from glibc's heap between the quantized layers made meanwhile, and the heap
    #: keeps them once freed (~45 MiB by the end of InternVL2-1B's layers, on top of the quantized model); trimming
    #: every 64 MiB bounds that at a few MiB for ~10 trims a model of that size (trimming after every layer costs
    #: ~0.5 s of load on its 168 layers: freed pages are faulted in again by the next layer).
    TRIM_EVERY = 64 << 20

    def quantize(self, name: str, module: nn.Module, device: torch.device) -> nn.Module:
        if self._since_trim >= self.TRIM_EVERY:
            _return_freed_memory()
            self._since_trim = 0
        self._since_trim += sum(p.numel() * p.element_size() for p in module.parameters())
        if isinstance(module, StackedExperts):
            return self._quantize_experts(name, module, device)
        assert isinstance(module, nn.Linear), (name, type(module))
        linear = module
        group = _int4_group(linear.in_features, self.config.group_size) if self.config.mode == "int4" else None
        if self.config.mode == "int4" and group is not None:
            self.done[name] = f"int4 g{group}"
            return Int4Linear.from_linear(linear, group, device, release=self.release)
        if self.config.mode == "int4":
            self.fallbacks.append(f"{name} (in_features {linear.in_features})")
        self.done[name] = "int8"
        return Int8Linear.from_linear(linear, device, release=self.release)

    def _quantize_experts(self, name: str, experts: StackedExperts, device: torch.device) -> nn.Module:
        group = _int4_group(experts.in_features, self.config.group_size) if self.config.mode == "int4" else None
        if group is not None and QuantizedExperts.int4_supports(experts.in_features, group):
            self.done[name] = f"int4 g{group} experts"
            return QuantizedExperts.from_stacked(experts, device, group_size=group)
        if self.config.mode == "int4":
            self.fallbacks.append(f"{name} (in_features {experts.in_features})")
        self.done[name] = "int8 experts"
        return QuantizedExperts.from_stacked(experts, device)

    def report(self) -> dict[str, str]:
        if self.fallbacks:
            logger.warning("int4: no group size in %s divides the input width of %d layer(s), kept as int8: %s%s",
                           INT4_GROUP_SIZES, len(self.fallbacks), ", ".join(self.fallbacks[:8]),
                           " ..." if len(self.fallbacks) > 8 else "")
        logger.info("quantized %d linear layers / expert stacks (%s%s)", len(self.done), self.config.mode,
                    ", vision included" if self.include_vision else "")
        _return_freed_memory()
        return dict(self.done)


def quantize_model(model: nn.Module, mode: str | QuantizationConfig, include_vision: bool | None = None, *,
                   device_for: Callable[[str], torch.device] | None = None) -> dict[str, str]:
    """Quantize ``model`` in place; returns {module name: what it became} (e.g. "int4 g128", "int8").

    mode: "int8", "int4" or a ``QuantizationConfig``; include_vision overrides the config's flag.
    device_for: module name -> the device its quantized layer goes to (default: where it is now);
    the int4 layout is packed for that device's kernel. Raises ``UnsupportedFeature`` before touching
    any layer when a target device has no kernel for the mode.
    """
    config = QuantizationConfig.parse(mode)
    assert config is not None
    quantizer = LayerQuantizer(config, include_vision)
    names = [name for name, module in model.named_modules() if quantizer.wants(name, module)]

    def target(name: str) -> torch.device:
        if device_for is not None:
            return device_for(name)
        weight = model.get_submodule(name).weight
        assert isinstance(weight, torch.Tensor)
        return weight.device

    if config.mode == "int4":
        for device in {target(name) for name in names}:
            int4_backend(device)                              # fail before the first layer changes

    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        new = quantizer.quantize(name, linear, target(name))
        setattr(parent, child, new)
        del linear, new                                        # the float weight goes now, not at the end
    return quantizer.report()


def _return_freed_memory() -> None:
    """Hand the freed float weights back to the OS (glibc keeps small freed blocks in its heap, so the
    process would otherwise stay at its 16-bit size); a no-op where there is no glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (a tied tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.data_ptr() in seen or tensor.device.type == "meta":
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
