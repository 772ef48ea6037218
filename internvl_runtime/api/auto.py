"""``AutoModel.from_pretrained``: the official quick start's loading call, natively.

Every keyword of the official snippets is accepted. Those with nothing to do here are documented
no-ops (``trust_remote_code``: we never run code from the checkpoint; ``low_cpu_mem_usage``: loading
is always tensor-by-tensor; ``use_flash_attn``: attention always goes through SDPA, which picks the
flash kernel where the device has one). Those we cannot honour raise ``UnsupportedFeature``; an
unknown keyword raises ``TypeError`` naming it. Nothing is silently ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..config import InternVLConfig
from ..hardware import auto_dtype
from ..errors import ConfigError, InvalidRequest, UnsupportedFeature
from ..models.internvl import InternVLModel, build_model
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
    """A single device from ``device_map``; multi-device maps are handled in ``placement``."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, (str, torch.device, int)):
        if device_map == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)
    elif isinstance(device_map, dict):
        devices = {torch.device(f"cuda:{d}" if isinstance(d, int) else d) for d in device_map.values()}
        if len(devices) != 1:
            raise UnsupportedFeature("device_map spreading the model over several devices is not supported "
                                     "yet; pass one device or device_map=None")
        device = devices.pop()
    else:
        raise InvalidRequest(f"device_map must be None, 'auto', a device or a dict, got {device_map!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest(f"device_map asks for {device} but CUDA is not available on this machine")
    return device


class AutoModel:
    """Drop-in for ``transformers.AutoModel`` on InternVL2 checkpoints."""

    @staticmethod
    def from_pretrained(path: str | Path, *, torch_dtype: Any = None, low_cpu_mem_usage: bool = True,
                        use_flash_attn: bool = True, trust_remote_code: bool = False, device_map: Any = None,
                        load_in_8bit: bool = False, load_in_4bit: bool = False, allow_pickle: bool = False,
                        **kwargs: Any) -> InternVLChatModel:
        if kwargs:
            raise TypeError(f"AutoModel.from_pretrained() got unsupported keyword(s): {', '.join(sorted(kwargs))}")
        if load_in_8bit or load_in_4bit:
            raise UnsupportedFeature("load_in_8bit / load_in_4bit are not supported yet by this build")
        folder = Path(path)
        if not folder.exists():
            raise ConfigError(f"checkpoint folder {str(folder)!r} does not exist (download it first, e.g. "
                              f"`internvl download OpenGVLab/InternVL2-1B --local-dir {folder}`)")
        config = InternVLConfig.from_pretrained(folder)
        device = resolve_device(device_map)
        dtype = resolve_dtype(torch_dtype, config, device)
        model = build_model(folder, dtype=dtype, device=device, config=config, allow_pickle=allow_pickle,
                            model_class=InternVLChatModel)
        logger.info("loaded %s (%s) in %s on %s", folder, config.llm.architecture, dtype, device)
        return model  # type: ignore[return-value]
