"""LMDeploy's configuration classes, accepted by :func:`internvl_runtime.pipeline` as LMDeploy's ``pipeline``
takes them, and mapped onto this runtime's own settings.

Each class has LMDeploy's fields (names and defaults of LMDeploy 0.18) so that code written for LMDeploy builds
them unchanged. :func:`engine_settings` turns them into what this runtime reads:

=======================================  =====================================================================
LMDeploy                                 here
=======================================  =====================================================================
``session_len``                          ``EngineConfig.max_model_len`` (the context length)
``max_batch_size``                       ``EngineConfig.max_num_seqs``
``cache_max_entry_count``                the KV cache's share of the memory left once the weights are loaded
                                         (``EngineConfig.kv_cache_bytes``; estimated from the free memory now
                                         less the checkpoint's weight files)
``cache_block_seq_len`` / ``block_size`` ``EngineConfig.block_size``
``num_gpu_blocks``                       ``EngineConfig.num_blocks``
``max_prefill_token_num``                ``EngineConfig.max_num_batched_tokens``
``enable_prefix_caching``                ``EngineConfig.enable_prefix_caching``
``tp``                                   ``tensor_parallel_size``
``dtype``                                the weights' dtype (``"auto"``: the checkpoint's)
``download_dir`` / ``revision``          the hub cache folder and revision (``HubOptions``)
``VisionConfig.max_batch_size``          images per vision-encoder batch (``EngineConfig.vision_batch_tiles``
                                         = images x 13 tiles, the most one InternVL2 image has by default)
``ChatTemplateConfig.meta_instruction``  the system message of every conversation that has none
=======================================  =====================================================================

Fields that only tune LMDeploy's own kernels or services (CUDA graphs, metrics, communication backends...)
are accepted and have no effect here (``_NO_EFFECT``). Any other field set to something other than its
default (KV-cache quantization ``quant_policy``, AWQ/GPTQ ``model_format``, data or expert parallelism, LoRA
adapters, ...) raises :class:`~internvl_runtime.errors.UnsupportedFeature` naming the field: nothing is
silently ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..engine.engine import EngineConfig
from ..errors import InvalidRequest, UnsupportedFeature
from ..hardware import available_memory
from ..hub import HubOptions

#: Tiles of one InternVL2 image at most with the default ``max_dynamic_patch`` (12 + the thumbnail).
TILES_PER_IMAGE = 13

#: Fields that tune only LMDeploy's own machinery; any value is accepted and changes nothing here.
_NO_EFFECT = frozenset({
    "cache_chunk_size", "cache_checkpoint_interval", "cache_prompt", "cache_prompt_boundary_skip",
    "cache_generation", "num_tokens_per_iter", "max_prefill_iters", "async_", "empty_init", "communicator",
    "enable_metrics", "prefill_interval", "kernel_block_size", "thread_safe", "eager_mode",
    "cudagraph_capture_batch_sizes", "piecewise_cudagraph_max_tokens", "enable_microbatch", "enable_mp_engine",
    "mp_engine_backend", "distributed_executor_backend", "gemm_input_dtype", "enable_transfer_obj_ref",
    "logprobs_mode", "num_cpu_blocks",
})

_DTYPES: dict[str, torch.dtype | str] = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TurbomindEngineConfig:
    """LMDeploy's TurboMind engine options (see the module docstring for how each maps)."""

    dtype: str = "auto"
    gemm_input_dtype: str | None = None
    model_format: str | None = None
    tp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    device_num: int | None = None
    attn_tp_size: int | None = None
    attn_cp_size: int | None = None
    attn_dp_size: int | None = None
    mlp_tp_size: int | None = None
    mlp_dp_size: int | None = None
    outer_dp_size: int | None = None
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    devices: list[int] | None = None
    session_len: int | None = None
    max_batch_size: int | None = None
    cache_max_entry_count: float = 0.8
    cache_chunk_size: int = -1
    cache_block_seq_len: int = 64
    enable_prefix_caching: bool = False
    cache_checkpoint_interval: int = 4096
    cache_prompt: str = "auto"
    cache_prompt_boundary_skip: int = 1
    cache_generation: str = "auto"
    quant_policy: int = 0
    rope_scaling_factor: float = 0.0
    use_logn_attn: bool = False
    download_dir: str | None = None
    revision: str | None = None
    max_prefill_token_num: int = 8192
    num_tokens_per_iter: int = 0
    max_prefill_iters: int = 1
    async_: int = 1
    empty_init: bool = False
    language_model_only: bool = False
    communicator: str = "nccl"
    hf_overrides: dict[str, Any] | None = None
    enable_metrics: bool = True

    def __post_init__(self) -> None:
        _check_common(self)


@dataclass
class PytorchEngineConfig:
    """LMDeploy's PyTorch engine options (see the module docstring for how each maps)."""

    dtype: str = "auto"
    tp: int = 1
    dp: int = 1
    dp_rank: int = 0
    ep: int = 1
    session_len: int | None = None
    max_batch_size: int | None = None
    attn_tp_size: int | None = None
    mlp_tp_size: int | None = None
    moe_tp_size: int | None = None
    cache_max_entry_count: float = 0.8
    prefill_interval: int = 16
    block_size: int = 64
    kernel_block_size: int = -1
    num_cpu_blocks: int = 0
    num_gpu_blocks: int = 0
    adapters: dict[str, str] | None = None
    max_prefill_token_num: int = 8192
    cudagraph_capture_batch_sizes: list[int] | None = None
    thread_safe: bool = False
    enable_prefix_caching: bool = False
    prefix_cache_state_budget: int = 0
    prefix_cache_decode_state_interval: int = 0
    device_type: str = "cuda"
    eager_mode: bool = False
    custom_module_map: dict[str, str] | None = None
    download_dir: str | None = None
    revision: str | None = None
    quant_policy: int = 0
    distributed_executor_backend: str | None = None
    empty_init: bool = False
    enable_microbatch: bool = False
    enable_eplb: bool = False
    enable_mp_engine: bool = False
    mp_engine_backend: str = "mp"
    model_format: str | None = None
    enable_metrics: bool = True
    hf_overrides: dict[str, Any] | None = None
    language_model_only: bool = False
    logprobs_mode: str | None = None
    enable_return_routed_experts: bool = False
    enable_transfer_obj_ref: bool = False

    def __post_init__(self) -> None:
        _check_common(self)
        if self.device_type != "cuda":
            raise UnsupportedFeature(f"PytorchEngineConfig.device_type={self.device_type!r} is not supported: this "
                                     "runtime runs on CUDA or the CPU (pipeline(..., device=...))")


@dataclass
class VisionConfig:
    """LMDeploy's vision-encoder options: ``max_batch_size`` images are encoded together."""

    max_batch_size: int = 1
    thread_safe: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int) \
                or self.max_batch_size < 1:
            raise InvalidRequest(f"VisionConfig.max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")


@dataclass
class ChatTemplateConfig:
    """LMDeploy's chat-template options. The checkpoint's own template is always used; ``model_name`` may name
    it (any InternVL template name is accepted) and ``meta_instruction`` (or ``system``) replaces its default
    system message. Custom role markers cannot be honoured and raise ``UnsupportedFeature``."""

    model_name: str | None = None
    system: str | None = None
    meta_instruction: str | None = None
    eosys: str | None = None
    user: str | None = None
    eoh: str | None = None
    assistant: str | None = None
    eoa: str | None = None
    tool: str | None = None
    eotool: str | None = None
    separator: str | None = None
    capability: str | None = None
    stop_words: list[str] | None = None

    def __post_init__(self) -> None:
        custom = [f.name for f in fields(self) if f.name not in ("model_name", "system", "meta_instruction")
                  and getattr(self, f.name) is not None]
        if custom:
            raise UnsupportedFeature(f"ChatTemplateConfig.{', '.join(custom)} cannot be honoured: the checkpoint's "
                                     "own chat template is used (set meta_instruction for the system message)")
        if self.model_name is not None and not _is_internvl_template(self.model_name):
            raise UnsupportedFeature(f"ChatTemplateConfig.model_name={self.model_name!r} cannot be honoured: the "
                                     "checkpoint's own InternVL template is used")

    @property
    def system_message(self) -> str | None:
        """The system message this config sets, if any (``meta_instruction`` first, as LMDeploy)."""
        return self.meta_instruction if self.meta_instruction is not None else self.system


def _is_internvl_template(name: str) -> bool:
    # LMDeploy's InternVL template names (internvl2-internlm2, internvl2-phi3, internvl2_5, internvl-zh-hermes2...)
    # and the LLM templates they build on; the checkpoint's config.json says which one applies.
    known = ("internvl", "internlm2", "hermes", "phi-3", "phi3", "llama3", "qwen")
    return name.lower().startswith(known)


def _check_common(config: TurbomindEngineConfig | PytorchEngineConfig) -> None:
    """LMDeploy's own validity checks, as InvalidRequest (an assertion there)."""
    name = type(config).__name__
    if config.dtype not in _DTYPES:
        raise InvalidRequest(f"{name}.dtype must be one of {sorted(_DTYPES)}, got {config.dtype!r}")
    for attr in ("tp", "max_batch_size", "session_len"):
        value = getattr(config, attr)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidRequest(f"{name}.{attr} must be an integer >= 1, got {value!r}")
    ratio = config.cache_max_entry_count
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise InvalidRequest(f"{name}.cache_max_entry_count must be a fraction in (0, 1), got {ratio!r}")


@dataclass
class EngineSettings:
    """What the LMDeploy configs ask of ``pipeline``: the engine config and the loader's options."""

    engine_config: EngineConfig
    dtype: torch.dtype | str | None = "auto"
    tensor_parallel_size: int = 1
    hub: HubOptions | None = None
    system_message: str | None = None


def _refuse_unhonoured(config: TurbomindEngineConfig | PytorchEngineConfig) -> None:
    mapped = {"dtype", "tp", "session_len", "max_batch_size", "cache_max_entry_count", "cache_block_seq_len",
              "block_size", "num_gpu_blocks", "max_prefill_token_num", "enable_prefix_caching", "download_dir",
              "revision", "device_type"}
    name = type(config).__name__
    for f in fields(config):
        if f.name in mapped or f.name in _NO_EFFECT:
            continue
        value, default = getattr(config, f.name), f.default
        if f.name == "model_format" and value in (None, "hf"):
            continue
        if value != default:
            raise UnsupportedFeature(f"{name}.{f.name}={value!r} cannot be honoured by this runtime "
                                     f"(only the default {default!r} is supported)")


def _kv_cache_bytes(ratio: float, model_path: str | Path, device: str) -> int:
    """LMDeploy's ``cache_max_entry_count``: this share of the memory free once the weights are in. The weights
    are not loaded yet, so their size is taken as the checkpoint's weight files'."""
    folder = Path(model_path)
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0
    if str(device).startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
    else:
        free = available_memory()
    return max(1, int(max(free - weights, 0) * ratio))


def engine_settings(model_path: str | Path, backend_config: Any, *, device: str,
                    vision_config: VisionConfig | None = None, chat_template_config: ChatTemplateConfig | None = None,
                    session_len: int | None = None) -> EngineSettings | None:
    """Map LMDeploy's configs (any of them may be None) to ``EngineSettings``; None when none is an LMDeploy
    config and ``session_len`` is not given (``pipeline`` then builds the engine as it always has)."""
    lmdeploy_backend = isinstance(backend_config, (TurbomindEngineConfig, PytorchEngineConfig))
    if backend_config is not None and not lmdeploy_backend and not isinstance(backend_config, EngineConfig):
        raise InvalidRequest(f"backend_config must be a TurbomindEngineConfig, a PytorchEngineConfig or an "
                             f"EngineConfig, got {type(backend_config).__name__}")
    if not lmdeploy_backend and vision_config is None and chat_template_config is None and session_len is None:
        return None
    if isinstance(backend_config, EngineConfig):
        kwargs: dict[str, Any] = {f.name: getattr(backend_config, f.name) for f in fields(backend_config)}
    else:
        kwargs = {}
    settings = EngineSettings(engine_config=EngineConfig())
    if lmdeploy_backend:
        _refuse_unhonoured(backend_config)
        settings.dtype = _DTYPES[backend_config.dtype]
        settings.tensor_parallel_size = backend_config.tp
        if backend_config.session_len is not None:
            kwargs["max_model_len"] = backend_config.session_len
        if backend_config.max_batch_size is not None:
            kwargs["max_num_seqs"] = backend_config.max_batch_size
        kwargs["block_size"] = (backend_config.block_size if isinstance(backend_config, PytorchEngineConfig)
                                else backend_config.cache_block_seq_len)
        kwargs["max_num_batched_tokens"] = max(backend_config.max_prefill_token_num, kwargs.get("max_num_seqs", 1))
        kwargs["enable_prefix_caching"] = backend_config.enable_prefix_caching
        if isinstance(backend_config, PytorchEngineConfig) and backend_config.num_gpu_blocks > 0:
            kwargs["num_blocks"] = backend_config.num_gpu_blocks
        else:
            kwargs["kv_cache_bytes"] = _kv_cache_bytes(backend_config.cache_max_entry_count, model_path, device)
        if backend_config.download_dir is not None or backend_config.revision is not None:
            settings.hub = HubOptions(revision=backend_config.revision, cache_dir=backend_config.download_dir)
    if session_len is not None:
        if kwargs.get("max_model_len") not in (None, session_len):
            raise InvalidRequest(f"session_len={session_len} disagrees with the backend config's "
                                 f"{kwargs['max_model_len']}")
        kwargs["max_model_len"] = session_len
    if vision_config is not None:
        kwargs["vision_batch_tiles"] = vision_config.max_batch_size * TILES_PER_IMAGE
    if chat_template_config is not None:
        settings.system_message = chat_template_config.system_message
    settings.engine_config = EngineConfig(**kwargs)
    return settings


def set_log_level(level: str | int) -> None:
    """LMDeploy's ``log_level``: the level of this package's loggers (``"WARNING"``, ``"INFO"``...)."""
    if isinstance(level, str) and not isinstance(logging.getLevelName(level.upper()), int):
        raise InvalidRequest(f"log_level must be one of CRITICAL, ERROR, WARNING, INFO, DEBUG, got {level!r}")
    logging.getLogger("internvl_runtime").setLevel(level.upper() if isinstance(level, str) else level)
