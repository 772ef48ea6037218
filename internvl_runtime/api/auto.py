"""``AutoModel.from_pretrained``: the official quick start's loading call, natively.

Every keyword of the official snippets is accepted. Those with nothing to do here are documented
no-ops (``trust_remote_code``: we never run code from the checkpoint; ``low_cpu_mem_usage``: loading
is always tensor-by-tensor; ``use_flash_attn``: attention always goes through SDPA, which picks the
flash kernel where the device has one). Those we cannot honour raise ``UnsupportedFeature``; an
unknown keyword raises ``TypeError`` naming it. Nothing is silently ignored.

``load_in_8bit`` / ``load_in_4bit`` (and our ``quantization=``) load the checkpoint in ``torch_dtype``
on the CPU, then quantize the LLM's linear layers one by one onto their devices
(``internvl_runtime.quantization``). ``device_map`` may be one device, "auto", or a dict such as the
official ``split_model``'s (``internvl_runtime.placement``). Every check (devices exist, every layer
placed, a kernel for the dtype and the quantization on each device) runs before any weight is read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..compute_plan import apply_plan, choose_plan
from ..config import InternVLConfig
from ..errors import ConfigError, InvalidRequest, UnsupportedFeature
from ..hardware import auto_dtype, available_memory
from ..models.internvl import InternVLModel, build_model, meta_model
from ..placement import (EMBED, auto_device_map, dispatch_model, estimate_unit_bytes, normalize_device, physical,
                         placement_units, resolve_device_map)
from ..quantization import QuantizationConfig, int4_backend, quantize_model, resolve_quantization
from .chat import OfficialChatMixin

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


class InternVLChatModel(OfficialChatMixin, InternVLModel):
    """The loaded model: an ``nn.Module`` with the official ``chat``/``batch_chat``/``generate``.

    Example::

        model = AutoModel.from_pretrained("pretrained/InternVL2-1B", torch_dtype=torch.bfloat16).eval()
        tokenizer = AutoTokenizer.from_pretrained("pretrained/InternVL2-1B", trust_remote_code=True)
        print(model.chat(tokenizer, None, "Hello, who are you?", dict(max_new_tokens=64)))
    """


def resolve_dtype(torch_dtype: Any, config: InternVLConfig, device: torch.device | None = None) -> torch.dtype:
    """``torch_dtype`` as transformers takes it: a dtype, its name, or "auto" (the config's, or float32
    on a CPU without fast bf16 instructions; see ``hardware.auto_dtype``)."""
    if torch_dtype is None:
        return torch.float32  # transformers' default when no dtype is given
    if torch_dtype == "auto":
        return auto_dtype(config.torch_dtype, device or torch.device("cpu"))
    if isinstance(torch_dtype, torch.dtype):
        dtype = torch_dtype
    elif isinstance(torch_dtype, str):
        name = torch_dtype
        if name.removeprefix("torch.") not in _DTYPES:
            raise InvalidRequest(f"torch_dtype {torch_dtype!r} is not one of {', '.join(_DTYPES)} or 'auto'")
        dtype = _DTYPES[name.removeprefix("torch.")]
    else:
        raise InvalidRequest(f"torch_dtype must be a torch.dtype or a string, got {torch_dtype!r}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise InvalidRequest(f"torch_dtype {dtype} is not supported (float32, bfloat16, float16)")
    return dtype


def resolve_device(device_map: Any) -> torch.device:
    """A single device from ``device_map`` (None, "auto", a device, or a dict naming one device);
    ``UnsupportedFeature`` for a dict naming several (``placement.resolve_device_map`` handles those)."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, (str, torch.device, int)) and not isinstance(device_map, bool):
        if device_map == "auto":
            return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return normalize_device(device_map)
    if isinstance(device_map, Mapping):
        devices = {normalize_device(d, name=f"device_map[{k!r}]") for k, d in device_map.items()}
        if len(devices) != 1:
            raise UnsupportedFeature("this device_map names several devices; load through AutoModel.from_pretrained")
        return devices.pop()
    raise InvalidRequest(f"device_map must be None, 'auto', a device or a dict, got {device_map!r}")


def check_dtype_runs(dtype: torch.dtype, device: torch.device) -> None:
    """``InvalidRequest`` for a dtype the device cannot compute in (bfloat16 before CUDA compute
    capability 8.0). CPUs run all three; without avx512_bf16/AMX, 16-bit is slow (see ``hardware``)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            raise InvalidRequest(f"bfloat16 on {device} needs CUDA compute capability 8.0+, this GPU is {major}.{minor}; "
                                 f"use torch_dtype=torch.float16 or torch.float32")


def _auto_map(config: InternVLConfig, dtype: torch.dtype,
              quantization: QuantizationConfig | None) -> dict[str, torch.device] | None:
    """``device_map="auto"`` with CUDA: fill the GPUs in order (90% of their free memory), then the CPU;
    None when the whole model fits on GPU 0."""
    skeleton = meta_model(config, dtype)
    sizes = estimate_unit_bytes(skeleton, dtype, quantization.bits if quantization else None)
    budgets = [(torch.device("cuda", i), int(torch.cuda.mem_get_info(i)[0] * 0.9))
               for i in range(torch.cuda.device_count())]
    if sum(sizes.values()) <= budgets[0][1]:
        return None
    available = available_memory()
    return auto_device_map(sizes, budgets + [(torch.device("cpu"), int(available * 0.9))])


def _load(folder: Path, config: InternVLConfig, dtype: torch.dtype, device: torch.device,
          unit_devices: dict[str, torch.device] | None, quantization: QuantizationConfig | None,
          allow_pickle: bool) -> InternVLChatModel:
    if unit_devices is None and quantization is None:
        return build_model(folder, dtype=dtype, device=physical(device), config=config,  # type: ignore[return-value]
                           allow_pickle=allow_pickle, model_class=InternVLChatModel)
    # Read on the CPU; each layer then goes to its device, quantized or whole (peak device memory:
    # the placed model plus one layer).
    model = build_model(folder, dtype=dtype, device="cpu", config=config, allow_pickle=allow_pickle,
                        model_class=InternVLChatModel)
    if quantization is not None:
        def device_for(name: str) -> torch.device:
            if unit_devices is None:
                return physical(device)
            unit = max((u for u in unit_devices if name == u or name.startswith(u + ".")), key=len)
            return physical(unit_devices[unit])
        quantize_model(model, quantization, device_for=device_for)
        model.quantization = quantization  # type: ignore[assignment]
    if unit_devices is not None:
        dispatch_model(model, unit_devices)
    else:
        model.to(physical(device))
    return model  # type: ignore[return-value]


class AutoModel:
    """Drop-in for ``transformers.AutoModel`` on InternVL2 checkpoints."""

    @staticmethod
    def from_pretrained(path: str | Path, *, torch_dtype: Any = None, low_cpu_mem_usage: bool = True,
                        use_flash_attn: bool = True, trust_remote_code: bool = False, device_map: Any = None,
                        load_in_8bit: bool = False, load_in_4bit: bool = False, quantization: Any = None,
                        allow_pickle: bool = False, **kwargs: Any) -> InternVLChatModel:
        """Load a checkpoint folder. ``quantization``: "int8", "int4", "int4:g64", a dict or a
        ``QuantizationConfig`` (``load_in_8bit``/``load_in_4bit`` are the official spellings of the
        first two). ``device_map``: None (CPU), a device, "auto", or {module name: device}."""
        if kwargs:
            raise TypeError(f"AutoModel.from_pretrained() got unsupported keyword(s): {', '.join(sorted(kwargs))}")
        quant = resolve_quantization(quantization, load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
        folder = Path(path)
        if not folder.exists():
            raise ConfigError(f"checkpoint folder {str(folder)!r} does not exist (download it first, e.g. "
                              f"`internvl download OpenGVLab/InternVL2-1B --local-dir {folder}`)")
        config = InternVLConfig.from_pretrained(folder)
        unit_devices: dict[str, torch.device] | None = None
        if isinstance(device_map, Mapping):
            unit_devices = resolve_device_map(device_map, config.llm.num_hidden_layers)
            device = unit_devices[EMBED]
            if len(set(unit_devices.values())) == 1:
                unit_devices = None
        else:
            if device_map is None and quant is not None and torch.cuda.is_available():
                device_map = torch.cuda.current_device()   # transformers' default for 8/4-bit loading
            device = resolve_device(device_map)
        dtype = resolve_dtype(torch_dtype, config, device)
        if device_map == "auto" and device.type == "cuda":
            unit_devices = _auto_map(config, dtype, quant)
        units = unit_devices or dict.fromkeys(placement_units(config.llm.num_hidden_layers), device)
        for used in set(units.values()):
            check_dtype_runs(dtype, physical(used))
        if quant is not None and quant.mode == "int4":
            for unit, used in units.items():
                if unit.startswith("language_model.") or quant.include_vision:
                    int4_backend(physical(used))
        model = _load(folder, config, dtype, device, unit_devices, quant, allow_pickle)
        apply_plan(model, choose_plan(dtype, device))
        if isinstance(device_map, Mapping) or unit_devices is not None:
            model.hf_device_map = {unit: str(used) for unit, used in units.items()}  # type: ignore[assignment]
        logger.info("loaded %s (%s) in %s on %s%s", folder, config.llm.architecture, dtype,
                    device if unit_devices is None else sorted({str(d) for d in unit_devices.values()}),
                    f", {quant.mode}" if quant else "")
        return model
