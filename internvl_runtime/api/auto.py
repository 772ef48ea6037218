"""``AutoModel.from_pretrained``: the official quick start's loading call, natively.

A thin facade over the one loader (``internvl_runtime.loading.load_model``), which the engine, the
server, the pipeline and tensor-parallel ranks use too; only the official spelling lives here.

``path`` is a checkpoint folder or a Hugging Face Hub id (``internvl_runtime.hub``). Every keyword of the
official snippets is accepted. Those with nothing to do here are documented
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

import os
from pathlib import Path
from typing import Any

from ..hub import HubOptions
from ..loading import DeviceMapSpec, DTypeSpec, QuantizationSpec, load_model
from ..models.internvl import InternVLModel
from .chat import OfficialChatMixin


class InternVLChatModel(OfficialChatMixin, InternVLModel):
    """The loaded model: an ``nn.Module`` with the official ``chat``/``batch_chat``/``generate``.

    Example::

        model = AutoModel.from_pretrained("pretrained/InternVL2-1B", torch_dtype=torch.bfloat16).eval()
        tokenizer = AutoTokenizer.from_pretrained("pretrained/InternVL2-1B", trust_remote_code=True)
        print(model.chat(tokenizer, None, "Hello, who are you?", dict(max_new_tokens=64)))
    """


class AutoModel:
    """Drop-in for ``transformers.AutoModel`` on InternVL2 checkpoints."""

    @staticmethod
    def from_pretrained(path: str | Path, *, torch_dtype: DTypeSpec = None, low_cpu_mem_usage: bool = True,
                        use_flash_attn: bool = True, trust_remote_code: bool = False,
                        device_map: DeviceMapSpec = None, load_in_8bit: bool = False, load_in_4bit: bool = False,
                        quantization: QuantizationSpec = None,
                        allow_pickle: bool = False, revision: str | None = None,
                        cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                        local_files_only: bool = False, **kwargs: Any) -> InternVLChatModel:
        """Load a checkpoint folder, or a Hugging Face Hub id (``"OpenGVLab/InternVL2-1B"``) fetched into the
        hub's cache with transformers' ``revision``, ``cache_dir``, ``token``, ``local_files_only`` (and
        ``HF_HUB_OFFLINE``); a folder of that name wins. ``quantization``: "int8", "int4", "int4:g64", a dict
        or a ``QuantizationConfig`` (``load_in_8bit``/``load_in_4bit`` are the official spellings of the
        first two). ``device_map``: None (CPU), a device, "auto", or {module name: device}."""
        if kwargs:
            raise TypeError(f"AutoModel.from_pretrained() got unsupported keyword(s): {', '.join(sorted(kwargs))}")
        hub = HubOptions(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        model = load_model(path, dtype=torch_dtype, device_map=device_map, quantization=quantization,
                           load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, allow_pickle=allow_pickle,
                           model_class=InternVLChatModel, hub=hub)
        assert isinstance(model, InternVLChatModel)
        return model
