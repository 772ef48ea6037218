"""``AutoModel.from_pretrained``: the official quick start's loading call, natively.

A thin facade over the one loader (``internvl_runtime.loading.load_model``), which the engine, the
server, the pipeline and tensor-parallel ranks use too; only the official spelling lives here.

``path`` is a checkpoint folder or a Hugging Face Hub id (``internvl_runtime.hub``). Every keyword of the
official snippets is accepted. Those with nothing to do here are documented
no-ops (``trust_remote_code``: we never run code from the checkpoint; ``low_cpu_mem_usage``: loading
is always tensor-by-tensor; ``use_flash_attn``: attention always goes through SDPA, which picks the
flash kernel where the device has one). Those we cannot honour raise ``UnsupportedFeature``; an
unknown keyword raises ``TypeError`` naming it. Nothing is silently ignored.

transformers' loading keywords: ``dtype`` is ``torch_dtype``'s newer name; ``attn_implementation``
("eager", "sdpa", "flash_attention_2") is accepted and changes nothing (the same SDPA / paged attention
runs whatever is asked: the numbers equal the eager reference's within float tolerance);
``use_safetensors=False`` also reads ``pytorch_model*.bin`` (``allow_pickle``), True/None read
safetensors only; ``quantization_config``, a ``BitsAndBytesConfig`` or its dict, maps ``load_in_8bit`` to
our int8 and ``load_in_4bit`` to our int4 (``quantization_config_spec``), and refuses what we cannot
honour. The returned model records ``name_or_path`` (the path or hub id as given) and
``generation_config`` (the checkpoint's generation_config.json).

``load_in_8bit`` / ``load_in_4bit`` (and our ``quantization=``) load the checkpoint in ``torch_dtype``
on the CPU, then quantize the LLM's linear layers one by one onto their devices
(``internvl_runtime.quantization``). ``device_map`` may be one device, "auto", or a dict such as the
official ``split_model``'s (``internvl_runtime.placement``). Every check (devices exist, every layer
placed, a kernel for the dtype and the quantization on each device) runs before any weight is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UnsupportedFeature
from ..hub import HubOptions
from ..loading import DeviceMapSpec, DTypeSpec, QuantizationSpec, load_model
from ..models.internvl import InternVLModel
from .chat import OfficialChatMixin
from .hf_generation_config import GenerationConfig

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")

# BitsAndBytesConfig fields (transformers 4.37+): what each may hold for us to honour it.
_NOT_QUANTIZED = ("vision_model", "mlp1")   # our quantization covers the LLM's linear layers only
_BNB_ACCEPTS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "llm_int8_threshold": ("6.0 (the default: ours has no outlier decomposition)", lambda v: v in (None, 6.0)),
    "llm_int8_skip_modules": ("modules we never quantize (vision_model, mlp1)",
                              lambda v: all(str(m).split(".")[0] in _NOT_QUANTIZED for m in v or ())),
    "llm_int8_enable_fp32_cpu_offload": ("false", lambda v: not v),
    "llm_int8_has_fp16_weight": ("false", lambda v: not v),
    "bnb_4bit_compute_dtype": ("the model's dtype", lambda v: True),      # checked against torch_dtype
    "bnb_4bit_quant_type": ("fp4 or nf4", lambda v: v in (None, "fp4", "nf4")),
    "bnb_4bit_use_double_quant": ("true or false", lambda v: True),
    "bnb_4bit_quant_storage": ("any", lambda v: True),
    "quant_method": ("bitsandbytes", lambda v: v in (None, "bitsandbytes")),
}


class InternVLChatModel(OfficialChatMixin, InternVLModel):
    """The loaded model: an ``nn.Module`` with the official ``chat``/``batch_chat``/``generate``.

    Example::

        model = AutoModel.from_pretrained("pretrained/InternVL2-1B", torch_dtype=torch.bfloat16).eval()
        tokenizer = AutoTokenizer.from_pretrained("pretrained/InternVL2-1B", trust_remote_code=True)
        print(model.chat(tokenizer, None, "Hello, who are you?", dict(max_new_tokens=64)))

    ``name_or_path`` and ``generation_config`` are set by ``AutoModel.from_pretrained``.
    """

    name_or_path: str = ""
    generation_config: GenerationConfig | None = None


def quantization_config_spec(config: Any) -> str | None:
    """A ``BitsAndBytesConfig`` (or its ``to_dict()``, or a dict of its fields) -> "int8", "int4" or None.

    ``load_in_8bit`` -> our int8 (weight-only, one scale per output channel; no outlier threshold: the
    default ``llm_int8_threshold`` is accepted, any other value refused), ``load_in_4bit`` -> our int4
    (grouped, ``bnb_4bit_quant_type`` fp4/nf4 and double quantization have no counterpart and are
    accepted as "some 4-bit weight format"). ``llm_int8_skip_modules``, CPU offload, fp16 weights, another
    ``quant_method`` (GPTQ, AWQ...) raise ``UnsupportedFeature``; a ``bnb_4bit_compute_dtype`` is checked
    by the caller against the model's dtype."""
    if config is None:
        return None
    data = config.to_dict() if hasattr(config, "to_dict") else config if isinstance(config, dict) else vars(config)
    fields = {str(k).lstrip("_"): v for k, v in dict(data).items()}
    eight, four = bool(fields.pop("load_in_8bit", False)), bool(fields.pop("load_in_4bit", False))
    if eight and four:
        raise UnsupportedFeature("quantization_config sets both load_in_8bit and load_in_4bit")
    for name, value in fields.items():
        if name not in _BNB_ACCEPTS:
            raise UnsupportedFeature(f"quantization_config field {name!r} is not supported (bitsandbytes' "
                                     f"load_in_8bit / load_in_4bit map to our int8 / int4)")
        allowed, accepts = _BNB_ACCEPTS[name]
        if not accepts(value):
            raise UnsupportedFeature(f"quantization_config {name}={value!r} cannot be honoured (ours is weight-only "
                                     f"int8/int4 of the LLM's linear layers; accepted: {allowed})")
    return "int8" if eight else "int4" if four else None


def _compute_dtype(config: Any) -> Any:
    data = config.to_dict() if hasattr(config, "to_dict") else config if isinstance(config, dict) else vars(config)
    value = dict(data).get("bnb_4bit_compute_dtype")
    return None if value in (None, "float32") else value


class AutoModel:
    """Drop-in for ``transformers.AutoModel`` on InternVL2 checkpoints."""

    @staticmethod
    def from_pretrained(path: str | Path, *, torch_dtype: DTypeSpec = None, low_cpu_mem_usage: bool = True,
                        use_flash_attn: bool = True, trust_remote_code: bool = False,
                        device_map: DeviceMapSpec = None, load_in_8bit: bool = False, load_in_4bit: bool = False,
                        quantization: QuantizationSpec = None,
                        allow_pickle: bool = False, revision: str | None = None,
                        cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                        local_files_only: bool = False, dtype: DTypeSpec = None,
                        attn_implementation: str | None = None, use_safetensors: bool | None = None,
                        quantization_config: Any = None, **kwargs: Any) -> InternVLChatModel:
        """Load a checkpoint folder, or a Hugging Face Hub id (``"OpenGVLab/InternVL2-1B"``) fetched into the
        hub's cache with transformers' ``revision``, ``cache_dir``, ``token``, ``local_files_only`` (and
        ``HF_HUB_OFFLINE``); a folder of that name wins. ``quantization``: "int8", "int4", "int4:g64", a dict
        or a ``QuantizationConfig`` (``load_in_8bit``/``load_in_4bit`` are the official spellings of the
        first two). ``device_map``: None (CPU), a device, "auto", or {module name: device}."""
        if kwargs:
            raise TypeError(f"AutoModel.from_pretrained() got unsupported keyword(s): {', '.join(sorted(kwargs))}")
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise TypeError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; give one")
        torch_dtype = torch_dtype if torch_dtype is not None else dtype
        if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise UnsupportedFeature(f"attn_implementation={attn_implementation!r}; accepted: "
                                     f"{', '.join(ATTN_IMPLEMENTATIONS)}")
        if use_safetensors is False:
            allow_pickle = True
        bnb = quantization_config_spec(quantization_config)
        if bnb is not None:
            if quantization is not None:
                raise TypeError("give quantization or quantization_config, not both")
            quantization = bnb
            compute = _compute_dtype(quantization_config) if bnb == "int4" else None
            if compute is not None:
                if torch_dtype is not None and str(compute).removeprefix("torch.") != str(torch_dtype).removeprefix(
                        "torch."):
                    raise UnsupportedFeature(f"bnb_4bit_compute_dtype={compute} differs from torch_dtype="
                                             f"{torch_dtype}: we compute in the model's dtype")
                torch_dtype = torch_dtype if torch_dtype is not None else compute
        hub = HubOptions(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        model = load_model(path, dtype=torch_dtype, device_map=device_map, quantization=quantization,
                           load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit, allow_pickle=allow_pickle,
                           model_class=InternVLChatModel, hub=hub)
        assert isinstance(model, InternVLChatModel)
        model.name_or_path = str(path)
        model.generation_config = GenerationConfig.from_pretrained(Path(model.config.source).parent)
        return model
