"""ServerConfig: every knob of ``internvl serve``, checked when built.

The CLI builds one ``--flag`` per field from this dataclass (name, type, default and the ``help`` in each
field's metadata), so the Python API, the command line and ``--help`` always agree.

Safety defaults (issue: "safety by default"): image URLs that resolve to loopback, private, link-local,
metadata or other non-public addresses are refused; local files are refused unless a folder is named with
``allowed_local_media_path``; body size, image bytes, image pixels, images per request, tiles per image and
fetch time are all bounded. On the network side (``serving/http_guard.py``): the Host header must be an IP
address, ``localhost``, the ``host`` name or one of ``allowed_hosts``; POST bodies must be JSON; CORS is off
unless ``allowed_origins`` names origins; request heads and bodies have read deadlines; connections are capped.

Several names and keys: ``served_model_name`` and ``api_key`` are lists (``--served-model-name a b``); a request
may name any of the models, and any key is accepted. A single string is taken as a list of one.

Example::

    config = ServerConfig(model="pretrained/InternVL2-1B", port=8000, api_key=["secret"], quantization="int8")
    app = create_app(async_engine, config)
"""

from __future__ import annotations

import os
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest
from ..processing.chat_template import ChatTemplate
from ..testing.checkpoints import DEMO_LABEL as DEMO_LABEL  # the demo's label lives with the demo checkpoints

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
_ATTENTION_BACKENDS = ("auto", "torch", "triton")     # engine.model_runner.ATTENTION_BACKENDS (no torch here)
_VISION_LOADS = ("auto", "lazy", "eager")      # loading.VISION_LOADS (no torch here)
_IMAGE_PREPROCESS = ("exact", "device")        # processing.image_preprocessor.IMAGE_PREPROCESS_MODES (no torch here)


def _opt(help_text: str, **extra: Any) -> dict[str, Any]:
    return {"help": help_text, **extra}


def _entries(name: str, value: Any) -> list[str]:
    """A list-valued field: a list of strings, or one comma-separated string (as on the command line)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise InvalidRequest(f"ServerConfig.{name} must be a list of strings, got {value!r}")
    return [item.strip() for item in items if item.strip()]


def _names(name: str, value: Any) -> list[str]:
    """A field of one or more strings taken whole (API keys and model names may hold commas): a list, or one
    string as a list of one; None as none."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise InvalidRequest(f"ServerConfig.{name} must be a list of strings, got {value!r}")
    return [item.strip() for item in items if item.strip()]


def resolve_device(device: str, cuda_available: bool | None = None) -> str:
    """``auto``: ``hardware.default_device`` (``cuda`` when torch sees a CUDA device, else ``cpu``); any other
    value as given. ``cuda_available``: default ``torch.cuda.is_available()``. ``internvl serve``, ``chat`` and
    ``generate`` all resolve their ``--device`` here."""
    if device != "auto":
        return device
    from ..hardware import default_device  # here, not at the top: it imports torch, `internvl --help` stays fast

    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return default_device(cuda_available)


def host_name(value: str) -> str:
    """A Host header value (or an ``allowed_hosts`` entry) as the Host check compares it: lower case, without
    the port, the IPv6 brackets or a trailing dot; ``""`` if it is no host name at all."""
    name = value.strip().lower()
    if any(c in name for c in "/@?#\\ "):
        return ""
    if name.startswith("["):
        name, sep, _ = name[1:].partition("]")
        return name if sep else ""
    if name.count(":") == 1:
        name = name.partition(":")[0]
    return name.rstrip(".")


def _host_entry(entry: str) -> str:
    name = host_name(entry)
    if not name:
        raise InvalidRequest(f"ServerConfig.allowed_hosts: {entry!r} is not a host name (give names like "
                             "chat.example.com, without scheme or path)")
    return name


def _origin_entry(entry: str) -> str:
    """A browser origin exactly as browsers send it: scheme://host[:port], no path, no trailing slash."""
    origin = entry.rstrip("/").lower()          # browsers send scheme and host in lower case
    scheme, sep, rest = origin.partition("://")
    if origin != "*" and (not sep or scheme not in ("http", "https") or not rest or "/" in rest):
        raise InvalidRequest(f"ServerConfig.allowed_origins: {entry!r} is not an origin (give scheme://host[:port], "
                             "e.g. https://app.example.com, or '*')")
    return origin


@dataclass
class ServerConfig:
    """OpenAI-compatible server: model, network, engine sizing and request limits."""

    # -- model -------------------------------------------------------------------------------------
    model: str = field(default="", metadata=_opt("checkpoint folder (official InternVL2 layout)", cli=False))
    served_model_name: list[str] = field(default_factory=list, metadata=_opt(
        "model ids clients may send in 'model', one or more (--served-model-name a b); any is accepted and the "
        "answer carries the one the request sent; /v1/models lists them all; the first labels the metrics "
        "(default: the checkpoint folder's name)", nargs="+"))
    dtype: str = field(default="auto", metadata=_opt("weights dtype: auto (the config's), float32, bfloat16, "
                                                     "float16", choices=_DTYPES))
    device: str = field(default="auto", metadata=_opt(
        "device for the model: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N"))
    revision: str | None = field(default=None, metadata=_opt(
        "for a Hugging Face Hub id: the branch, tag or commit (default: main)"))
    quantization: str | None = field(default=None, metadata=_opt(
        "weight-only quantization of the language model as it loads: int8, int4 (groups of 128 input "
        "columns) or int4:gN (groups of N: 32, 64, 128 or 256); none by default"))
    no_mmap: bool = field(default=False, metadata=_opt(
        "read every weight into memory instead of viewing the ones stored in their compute format (bf16 on the "
        "CPU) from the checkpoint file's read-only memory map (as llama.cpp's --no-mmap)"))
    pack_bf16: bool = field(default=False, metadata=_opt(
        "keep the language model's bf16 weights losslessly packed in ~12 bits a weight (every value kept): "
        "batch-1 decode on the CPU streams 3/4 of the bytes; steps of many sequences unpack as they go "
        "(slower products); bf16 CPU models only"))
    vision_load: str = field(default="auto", metadata=_opt(
        "when the vision encoder is read: auto (lazy on the CPU, eager on a GPU), lazy (on the first request "
        "with an image or video: a text-only server never reads it), or eager (at start)",
        choices=_VISION_LOADS))
    tensor_parallel_size: int = field(default=1, metadata=_opt(
        "split the decoder over N ranks (launch with torchrun --nproc-per-node N; see docs/scaling.md)"))
    demo: bool = field(default=False, metadata=_opt(
        "the checkpoint has random weights: every answer is labelled as such", cli=False))

    # -- network -----------------------------------------------------------------------------------
    host: str = field(default="127.0.0.1", metadata=_opt("address to listen on (loopback by default)"))
    port: int = field(default=23333, metadata=_opt("TCP port to listen on"))
    api_key: list[str] = field(default_factory=list, metadata=_opt(
        "require 'Authorization: Bearer KEY' on /v1/* and /metrics; several keys may be given (--api-key K1 K2), "
        "any is accepted (default: env INTERNVL_API_KEY, else none)", nargs="+"))
    log_level: str = field(default="info", metadata=_opt(
        "log level of the server's own loggers and uvicorn's", choices=_LOG_LEVELS))
    stats_log_interval_s: float = field(default=10.0, metadata=_opt(
        "seconds between the log lines on throughput, queues and KV cache use while the server is busy; "
        "0 turns them off"))
    strict_protocol: bool = field(default=False, metadata=_opt(
        "refuse unknown request fields (400) instead of accepting and logging them"))
    allowed_hosts: list[str] = field(default_factory=list, metadata=_opt(
        "host names the server answers to, comma-separated; '*' allows any (a check against DNS rebinding: "
        "IP addresses, localhost and the --host name are always allowed, other names only when listed)"))
    allowed_origins: list[str] = field(default_factory=list, metadata=_opt(
        "browser origins allowed to call the API across sites (CORS), comma-separated, e.g. "
        "https://app.example.com; '*' allows any; with none, CORS is off"))
    header_timeout_s: float = field(default=20.0, metadata=_opt(
        "seconds a client has to send a request's head (request line and headers); its connection is closed "
        "after"))
    body_timeout_s: float = field(default=60.0, metadata=_opt(
        "seconds a client has to send a request's body, counted from its head; 408 after"))
    max_connections: int = field(default=1024, metadata=_opt(
        "open connections served at once; more get 503 (keep it under the open-file limit, ulimit -n)"))

    # -- engine ------------------------------------------------------------------------------------
    max_model_len: int | None = field(default=None, metadata=_opt(
        "context length in tokens (default: the model's)"))
    max_num_seqs: int | None = field(default=None, metadata=_opt(
        "sequences decoded together in one step (default: 256 on a GPU, 16 on the CPU)"))
    max_num_batched_tokens: int = field(default=4096, metadata=_opt("tokens computed in one step"))
    num_blocks: int | None = field(default=None, metadata=_opt(
        "KV-cache blocks of 16 tokens (default: sized from memory: on GPUs by --gpu-memory-utilization, on the "
        "CPU a quarter of the available memory)"))
    gpu_memory_utilization: float = field(default=0.9, metadata=_opt(
        "share of each GPU's memory this server may use (as vLLM's): the KV cache gets what is left of it after "
        "the weights, a profiled worst-case step and the image feature cache; lower it to leave room for other "
        "processes"))
    attention_backend: str = field(default="auto", metadata=_opt(
        "attention kernels: auto (the Triton paged kernel on CUDA when triton is installed, torch elsewhere), "
        "torch, or triton", choices=_ATTENTION_BACKENDS))
    enforce_eager: bool = field(default=False, metadata=_opt(
        "run every decode step eagerly: no CUDA graphs (as vLLM's flag; graphs need the triton backend)"))
    disable_hybrid_kv_cache_manager: bool = field(default=False, metadata=_opt(
        "keep every KV block of sliding-window layers (GPT-OSS) as full-attention layers do, instead of giving "
        "back the blocks past the window (as vLLM's flag)"))
    max_queue_len: int = field(default=256, metadata=_opt(
        "requests in the engine at once (running + waiting); more get 503"))
    max_concurrent_requests: int = field(default=512, metadata=_opt(
        "generation requests the HTTP layer handles at once (fetching images included); more get 429"))

    # -- request limits ----------------------------------------------------------------------------
    max_body_bytes: int = field(default=32 * 2**20, metadata=_opt("largest request body in bytes (413 above)"))
    default_max_tokens: int = field(default=512, metadata=_opt(
        "tokens generated when a request gives no max_tokens (capped by the context)"))
    max_n: int = field(default=8, metadata=_opt("largest n (choices per request)"))
    max_images_per_request: int = field(default=32, metadata=_opt(
        "images in one request, all turns together (their tiles share --max-tiles-per-request)"))
    max_image_bytes: int = field(default=16 * 2**20, metadata=_opt("largest encoded image in bytes"))
    max_image_pixels: int = field(default=25_000_000, metadata=_opt(
        "largest decoded image in pixels (width x height), checked from the header before decoding"))
    max_video_bytes: int = field(default=64 * 2**20, metadata=_opt("largest encoded video in bytes"))
    max_video_frames: int = field(default=64, metadata=_opt("most frames sampled from one video (num_segments)"))
    max_video_seconds: float = field(default=600.0, metadata=_opt(
        "longest video accepted, in seconds, measured on the decoded frames' timestamps (not the header)"))
    max_video_decoded_bytes: int = field(default=16 * 2**30, metadata=_opt(
        "most bytes of frames decoding the videos of one request may produce, shared equally by its videos "
        "(width x height x 3 per frame, every frame decoded, sampled or not); bounds the decoding work, not the "
        "memory (frames are not all kept)"))
    max_tiles_per_image: int = field(default=12, metadata=_opt(
        "upper bound for max_dynamic_patch (tiles per image, thumbnail excluded)"))
    max_tiles_per_request: int = field(default=64, metadata=_opt(
        "448x448 tiles of one request, all images (thumbnails included) and video frames together: the vision "
        "work and memory bound. Images without an explicit max_dynamic_patch share what the frames leave "
        "(each at least one tile); explicit tile counts over it are refused"))
    media_fetch_timeout_s: float = field(default=10.0, metadata=_opt("seconds an http(s) image fetch may take"))
    max_redirects: int = field(default=3, metadata=_opt("redirects followed for an image URL, each re-checked"))
    allowed_local_media_path: str | None = field(default=None, metadata=_opt(
        "folder whose files requests may name as images (file:// URLs or paths); none by default"))
    allow_private_media_urls: bool = field(default=False, metadata=_opt(
        "allow image and video URLs resolving to loopback, private and other non-public addresses (unsafe); "
        "link-local and cloud metadata addresses stay refused"))
    allow_link_local_media_urls: bool = field(default=False, metadata=_opt(
        "allow image and video URLs resolving to link-local addresses (169.254.0.0/16, fe80::/10; unsafe: "
        "cloud metadata services live there); the known metadata addresses stay refused"))
    chat_template: str | None = field(default=None, metadata=_opt(
        "a Jinja chat template file (Hugging Face style: messages, tools, add_generation_prompt, bos_token, "
        "eos_token, chat_template_kwargs) rendered instead of the checkpoint's official template; images are "
        "<image> placeholders in the user messages' content"))
    image_preprocess: str = field(default="exact", metadata=_opt(
        "how images become tiles: exact (PIL on host threads, the official pixel values bit for bit) or device "
        "(torch's antialiased bicubic and the normalisation on the model's device: less host work per image, "
        "values within a uint8 step or so of the official ones; docs/image_preprocessing.md)",
        choices=_IMAGE_PREPROCESS))

    def __post_init__(self) -> None:
        self.api_key = _names("api_key", self.api_key)
        if not self.api_key:
            self.api_key = _names("api_key", os.environ.get("INTERNVL_API_KEY"))
        self.served_model_name = _names("served_model_name", self.served_model_name)
        if self.quantization is not None:       # a bad value is refused now, not after the server started
            from ..quantization import QuantizationConfig  # here: it imports torch, and `--help` stays fast

            QuantizationConfig.parse(self.quantization)
        if not isinstance(self.device, str) or not self.device:
            raise InvalidRequest(f"ServerConfig.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        self.device = resolve_device(self.device)
        if self.log_level not in _LOG_LEVELS:
            raise InvalidRequest(f"ServerConfig.log_level must be one of {', '.join(_LOG_LEVELS)}, "
                                 f"got {self.log_level!r}")
        if self.attention_backend not in _ATTENTION_BACKENDS:
            raise InvalidRequest(f"ServerConfig.attention_backend must be one of {', '.join(_ATTENTION_BACKENDS)}, "
                                 f"got {self.attention_backend!r}")
        if self.image_preprocess not in _IMAGE_PREPROCESS:
            raise InvalidRequest(f"ServerConfig.image_preprocess must be one of {', '.join(_IMAGE_PREPROCESS)}, "
                                 f"got {self.image_preprocess!r}")
        if self.vision_load not in _VISION_LOADS:
            raise InvalidRequest(f"ServerConfig.vision_load must be one of {', '.join(_VISION_LOADS)}, "
                                 f"got {self.vision_load!r}")
        if self.dtype not in _DTYPES:
            raise InvalidRequest(f"ServerConfig.dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        for name in ("tensor_parallel_size", "max_num_batched_tokens", "max_queue_len",
                     "max_concurrent_requests", "max_connections", "max_body_bytes", "default_max_tokens", "max_n",
                     "max_images_per_request", "max_image_bytes", "max_image_pixels", "max_tiles_per_image",
                     "max_tiles_per_request", "max_video_bytes", "max_video_frames", "max_video_decoded_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"ServerConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("max_model_len", "num_blocks", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidRequest(f"ServerConfig.{name} must be an integer >= 1 or None, got {value!r}")
        if isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise InvalidRequest(f"ServerConfig.max_redirects must be an integer >= 0, got {self.max_redirects!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InvalidRequest(f"ServerConfig.port must be in [0, 65535], got {self.port!r}")
        utilization = self.gpu_memory_utilization
        if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
            raise InvalidRequest(f"ServerConfig.gpu_memory_utilization must be in (0, 1], got {utilization!r}")
        interval = self.stats_log_interval_s
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval < 0:
            raise InvalidRequest(f"ServerConfig.stats_log_interval_s must be >= 0, got {interval!r}")
        for name in ("media_fetch_timeout_s", "header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidRequest(f"ServerConfig.{name} must be > 0, got {value!r}")
        self.allowed_hosts = [_host_entry(h) for h in _entries("allowed_hosts", self.allowed_hosts)]
        self.allowed_origins = [_origin_entry(o) for o in _entries("allowed_origins", self.allowed_origins)]
        if self.allowed_local_media_path is not None:
            folder = Path(self.allowed_local_media_path).expanduser()
            if not folder.is_dir():
                raise InvalidRequest(f"ServerConfig.allowed_local_media_path {str(folder)!r} is not a folder")
            self.allowed_local_media_path = str(folder.resolve())
        if self.chat_template is not None:
            ChatTemplate.from_file(self.chat_template)      # a missing or broken template stops the start here

    @property
    def model_names(self) -> list[str]:
        """The model ids a request may send (``served_model_name``, else the folder's name); /v1/models lists them."""
        if self.served_model_name:
            return list(self.served_model_name)
        name = Path(self.model).name if self.model else "internvl"
        return [name or "internvl"]

    @property
    def model_name(self) -> str:
        """The first served model id: the metrics' label, and the answer's ``model`` where no request named one."""
        return self.model_names[0]

    def engine_kwargs(self) -> dict[str, Any]:
        """The ``EngineConfig`` fields this config sets."""
        kwargs: dict[str, Any] = {"max_num_batched_tokens": self.max_num_batched_tokens,
                                  "max_images_per_request": self.max_images_per_request,
                                  "gpu_memory_utilization": self.gpu_memory_utilization,
                                  "attention_backend": self.attention_backend, "enforce_eager": self.enforce_eager,
                                  "disable_hybrid_kv_cache_manager": self.disable_hybrid_kv_cache_manager}
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.num_blocks is not None:
            kwargs["num_blocks"] = self.num_blocks
        return kwargs

    @classmethod
    def cli_fields(cls) -> list[Field[Any]]:
        """The dataclass fields that become ``--flags`` (``model`` and ``demo`` are positional/explicit)."""
        return [f for f in fields(cls) if f.metadata.get("cli", True)]
