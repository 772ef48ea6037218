"""Native CPU kernels for decode: matrix-vector products over bf16 (and int8) weights.

Why: at batch 1 every decode step streams all weights once, so it runs at the speed the GEMV reads them.
torch's own bf16 GEMV reaches only ~10-27 GB/s on the hosts we measured (the 151655x896 LM head ~9.5
GB/s), well under the ~33 GB/s of DRAM read bandwidth. These kernels keep the weights as stored, widen
them in registers (AVX-512 BF16 ``vdpbf16ps``; AVX-512F / AVX2 shift-and-FMA) and stream each row once,
threads taking chunks of rows from a shared counter. See ``csrc/gemv.cpp`` and ``benchmarks/gemv.py``.

Use::

    from internvl_runtime import kernels
    y = kernels.linear_bf16(x, weight, bias)   # == F.linear(x, weight, bias), fp32 accumulation
    kernels.describe()                           # "avx512bf16: ..." or "torch: <why>"

The extension is compiled just in time on the first call (about 10-20 s with 2 cores, once per host:
it is cached under torch's extensions folder, ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). Processes starting together (tensor-parallel ranks) build once: the others
wait for the build lock at most ``$INTERNVL_KERNEL_BUILD_TIMEOUT`` seconds (default 300), then fall back
to torch with a warning; see ``build.py``. One binary serves every x86-64 CPU: each ISA path is compiled
with a per-function target and the path is chosen here from /proc/cpuinfo, so no host ever executes an
instruction it lacks. Without a compiler / ninja, on a non-x86 CPU, or on any build error, every call
falls back to torch (``F.linear``), and the reason is logged once and shown by ``describe()``.

``INTERNVL_CPU_KERNEL=torch|avx2|avx512|avx512bf16`` forces a path (tests, benchmarks); forcing one the
CPU cannot run raises ``UnsupportedFeature`` naming the missing instruction set. Importing this package
has no side effects: nothing is read or compiled before the first call.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UnsupportedFeature
from ..hardware import cpu_flags
from . import build
from .build import CFLAGS as CFLAGS
from .build import EXTENSION_NAME as EXTENSION_NAME
from .build import LDFLAGS as LDFLAGS
from .build import SOURCES as SOURCES
from .build import BuildLockTimeout

logger = logging.getLogger(__name__)

ENV_VAR = "INTERNVL_CPU_KERNEL"
#: Every path, slowest first; "torch" is the pure-torch fallback.
PATHS = ("torch", "avx2", "avx512", "avx512bf16")
#: /proc/cpuinfo flags each native path needs (the same sets the C++ ``#pragma GCC target`` lines name).
REQUIRED_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2", "fma"),
    "avx512": ("avx512f",),
    "avx512bf16": ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"),
}
_PATH_ID = {"avx2": 0, "avx512": 1, "avx512bf16": 2}   # the `path` argument of the C++ operators

__all__ = ["ENV_VAR", "PATHS", "available", "describe", "dequantize_int4", "linear_bf16", "linear_int4",
           "linear_int8", "pack_int4", "selected_path", "supported_paths", "vision_attention"]


# --------------------------------------------------------------------------------------------- ISA

def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "x86-64")


def missing_flags(path: str) -> tuple[str, ...]:
    """The CPU flags ``path`` needs that this CPU lacks (empty: it can run here)."""
    if path == "torch":
        return ()
    if path not in REQUIRED_FLAGS:
        raise UnsupportedFeature(f"unknown CPU kernel path {path!r}; choose one of {', '.join(PATHS)}")
    if not _is_x86():
        return (f"x86-64 (this CPU is {platform.machine()})",)
    flags = cpu_flags()
    return tuple(f for f in REQUIRED_FLAGS[path] if f not in flags)


def supported_paths() -> tuple[str, ...]:
    """The native paths this CPU can execute, best first (compilation not attempted)."""
    return tuple(p for p in reversed(PATHS[1:]) if not missing_flags(p))


# ---------------------------------------------------------------------------------- compilation

class _State:
    lock = threading.Lock()
    ops: Any = None                 # torch.ops.internvl_kernels once loaded
    tried = False
    error: str | None = None        # why the extension is unusable (logged once)
    build_seconds: float | None = None
    library: str | None = None
    best = "torch"                  # the automatic choice, fixed once the extension is loaded


def _compile() -> str:
    """Build (or reuse the cached build of) the extension and load it; returns the .so path."""
    return build.compile_extension()


def _summary(exc: BaseException) -> str:
    """A build error in a few lines: its first line and the last lines (where the compiler says why)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 5:
        lines = [lines[0][:300], "..."] + lines[-3:]
    return f"{type(exc).__name__}: " + " | ".join(line[:400] for line in lines)


def _load() -> Any:
    """The loaded operator namespace, compiling on first use (thread-safe); None when unusable."""
    if _State.tried:
        return _State.ops
    with _State.lock:
        if _State.tried:
            return _State.ops
        if not _is_x86():
            _State.error = f"no native kernels for {platform.machine()}"
        elif not supported_paths():
            _State.error = "this CPU has neither AVX2+FMA nor AVX-512"
        else:
            start = time.perf_counter()
            try:
                _State.library = _compile()
                _State.ops = torch.ops.internvl_kernels
                _State.ops.linear_bf16  # noqa: B018 - raises if the library did not register the operators
                _State.best = supported_paths()[0]
            except BuildLockTimeout as exc:
                _State.ops = None
                _State.error = str(exc)
            except Exception as exc:  # noqa: BLE001 - any failure means: use torch
                _State.ops = None
                _State.error = f"building the native kernels failed ({_summary(exc)})"
            _State.build_seconds = time.perf_counter() - start
            if _State.ops is not None:
                try:
                    _register_fakes()
                except Exception as exc:  # noqa: BLE001 - only torch.compile tracing needs them
                    logger.debug("could not register fake kernels: %s", exc)
        if _State.error and _State.build_seconds is not None:   # a build was tried and failed
            logger.warning("internvl_runtime.kernels: %s; using torch's F.linear instead", _State.error)
        elif _State.error:                                       # expected on this CPU: not a problem
            logger.info("internvl_runtime.kernels: %s; using torch's F.linear", _State.error)
        else:
            logger.info("internvl_runtime.kernels: native kernels ready in %.1f s (%s)", _State.build_seconds,
                        _State.library)
        _State.tried = True
        return _State.ops


def _register_fakes() -> None:
    """Shape-only implementations, so torch.compile / FakeTensor tracing can see through the operators."""
    register = getattr(torch.library, "register_fake", None)   # torch >= 2.4
    if register is None:
        return

    def fake(x: torch.Tensor, w: torch.Tensor, *_: Any) -> torch.Tensor:
        return x.new_empty((x.shape[0], w.shape[0]))

    register("internvl_kernels::linear_bf16")(fake)
    register("internvl_kernels::linear_int8")(fake)
    register("internvl_kernels::linear_int4")(fake)

    def fake_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any) -> torch.Tensor:
        return q.new_empty((q.shape[0], q.shape[1], q.shape[2] * q.shape[3]))

    register("internvl_kernels::vision_attention")(fake_attention)


def _reset_for_tests() -> None:
    """Forget a failed or disabled build (a loaded library stays loaded: it cannot be unloaded)."""
    with _State.lock:
        if _State.ops is None:
            _State.tried = False
            _State.error = None


# ------------------------------------------------------------------------------------ selection

def _forced() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in PATHS:
        raise UnsupportedFeature(f"{ENV_VAR}={value!r} is not one of auto, {', '.join(PATHS)}")
    return value


def _resolve(path: str | None) -> str:
    """The path a call runs: ``path`` if given, else $INTERNVL_CPU_KERNEL, else the best one available."""
    wanted = path if path is not None else _forced()
    if wanted is not None:
        wanted = wanted.lower()
        if wanted == "torch":
            return "torch"
        lacking = missing_flags(wanted)
        if lacking:
            raise UnsupportedFeature(f"CPU kernel path {wanted!r} needs instruction set(s) this CPU lacks: "
                                     f"{', '.join(lacking)}")
        return wanted if _load() is not None else "torch"
    return _State.best if _load() is not None else "torch"


def selected_path() -> str:
    """The path ``linear_bf16`` takes with no explicit ``path`` (compiles the extension if needed)."""
    return _resolve(None)


def available() -> bool:
    """True when a native path will run (the extension built and the CPU supports one)."""
    return selected_path() != "torch"


def describe() -> str:
    """One line: the path chosen and why (or why the fallback), for logs and benchmark records."""
    try:
        path = selected_path()
    except UnsupportedFeature as exc:
        return f"error: {exc}"
    if path == "torch":
        reason = (f"forced by {ENV_VAR}" if _forced() == "torch" else _State.error or "no native path")
        return f"torch: F.linear ({reason})"
    built = f"built/loaded in {_State.build_seconds:.1f} s" if _State.build_seconds is not None else "loaded"
    return (f"{path}: native GEMV ({', '.join(REQUIRED_FLAGS[path])}); "
            f"{built} from {_State.library}; CPU supports {', '.join(supported_paths())}")


# ------------------------------------------------------------------------------------ operators

def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                path: str | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for bf16 ``x`` (..., K) and bf16 ``weight`` (N, K) on CPU.

    Accumulates in fp32 and rounds to bf16 once, like torch. ``bias`` may be bf16 or float32 (added in
    fp32). Made for few rows (decode, M <= 16); it is correct for any M but slower than torch's GEMM for
    many. Anything the kernel does not handle (other dtypes or devices, autograd) goes to ``F.linear``.
    ``path`` overrides $INTERNVL_CPU_KERNEL and the automatic choice.
    """
    chosen = _resolve(path)
    if (chosen == "torch" or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16
            or x.device.type != "cpu" or weight.device.type != "cpu" or weight.dim() != 2
            or (bias is not None and (bias.device.type != "cpu" or bias.dtype not in (torch.bfloat16, torch.float32)))
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))):
        return F.linear(x, weight, bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias)
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and not bias.is_contiguous():
        bias = bias.contiguous()
    out = _State.ops.linear_bf16(_flatten(x), weight, bias, _PATH_ID[chosen])
    return out.reshape(*x.shape[:-1], weight.shape[0]) if x.dim() != 2 else out


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None, *,
                path: str | None = None) -> torch.Tensor:
    """``(x @ weight.T) * scales + bias`` for int8 ``weight`` (N, K) with one scale per output row.

    The same semantics as the weight-only int8 layers (``quantization.Int8Linear``: W ~= q * scale[:, None]).
    ``x`` bf16 or float32 (the result has its dtype); ``scales`` and ``bias`` bf16 or float32. Accumulates in
    fp32 and rounds once. Falls back to a dequantizing torch expression where no native path runs.
    """
    chosen = _resolve(path)
    if (chosen == "torch" or x.dtype not in (torch.bfloat16, torch.float32) or weight.dtype != torch.int8
            or weight.dim() != 2 or scales.dtype not in (torch.bfloat16, torch.float32)
            or any(t.device.type != "cpu" for t in (x, weight, scales))
            or (bias is not None and (bias.device.type != "cpu" or bias.dtype not in (torch.bfloat16, torch.float32)))
            or (torch.is_grad_enabled() and x.requires_grad)):
        out = F.linear(x.float(), weight.float()) * scales.float()
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
    weight = weight.contiguous()
    scales = scales.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = _State.ops.linear_int8(_flatten(x), weight, scales, bias, _PATH_ID[chosen])
    return out.reshape(*x.shape[:-1], weight.shape[0]) if x.dim() != 2 else out


# ------------------------------------------------------------------------------------------ int4
#: The native int4 layout: per row, each block of 32 columns is 16 bytes, byte j holding column j in its
#: low nibble and column 16 + j in its high nibble (so one 16-byte load, split by nibble, gives the 32
#: columns in order). Scales and zeros: (N, K // group, 2) bf16, row-major, so each row streams its own.
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


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight an int4 layer computes with, W = (q - 8) * scale + zero, from the native layout.

    One native pass where the kernels run (prefill dequantizes a layer per call: ~20x faster than the
    torch expression below, which remains the fallback and the reference)."""
    if (dtype in (torch.bfloat16, torch.float32) and packed.device.type == "cpu" and _forced() != "torch"
            and _load() is not None and packed.is_contiguous() and scales_and_zeros.is_contiguous()
            and scales_and_zeros.dtype == torch.bfloat16):
        return _State.ops.dequantize_int4(packed, scales_and_zeros, group, dtype)
    q = unpack_int4(packed).float()
    n, k = q.shape
    sz = scales_and_zeros.float()                                         # (N, G, 2)
    w = (q.reshape(n, k // group, group) - 8) * sz[..., :1] + sz[..., 1:]
    return w.reshape(n, k).to(dtype)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
                bias: torch.Tensor | None = None, *, path: str | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for int4 weights in the native layout (``pack_int4``), fp32 accumulation.

    ``x`` (..., K) is taken in bf16 (the result has x's dtype). On CPUs with AVX-512 VNNI and groups of a
    multiple of 64 columns, the ``(q - 8) * scale`` part meets x quantized to int8 per group (scale
    max|x| / 127, as llama.cpp's q8_0 activations; ~0.7% of the output's scale on random data, small
    next to int4's own weight error); the ``zero`` part uses x exactly. Elsewhere the product is exact
    up to bf16 rounding. Where no native path runs, the weight is dequantized and one matmul runs.
    """
    chosen = _resolve(path)
    if chosen == "torch" or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        out = F.linear(x.float(), dequantize_int4(packed, scales_and_zeros, group))
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
    x2 = _flatten(x).to(torch.bfloat16)
    if bias is not None and (bias.dtype not in (torch.bfloat16, torch.float32) or not bias.is_contiguous()):
        bias = bias.float().contiguous()
    out = _State.ops.linear_int4(x2, packed, scales_and_zeros, group, bias, _PATH_ID[chosen]).to(x.dtype)
    return out.reshape(*x.shape[:-1], packed.shape[0]) if x.dim() != 2 else out


# ------------------------------------------------------------------------------------- attention

def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
                     path: str | None = None) -> torch.Tensor:
    """Non-causal softmax attention, q (N, L, heads, D), k and v (N, S, heads, D) -> (N, L, heads * D).

    The vision encoder's attention (``csrc/vision_attention.cpp``): any strides with a contiguous last
    dimension, so the q / k / v views of a fused qkv output (N, L, 3, heads, D) are read in place, and the
    result comes in the layout the output projection reads. ``scale`` defaults to D ** -0.5. Native only on
    the avx512bf16 path for bf16 CPU tensors without autograd (fp32 scores, exact softmax, bf16
    probabilities: see the source); anything else, or a native failure (logged), runs torch's SDPA on
    float32 copies of q, k and v and rounds the result to q's dtype.
    """
    if (q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0]
            or q.shape[2:] != k.shape[2:]):
        raise ValueError(f"vision_attention: q (N, L, heads, D) and k, v (N, S, heads, D) expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    n, length, heads, dim = q.shape
    scale = dim ** -0.5 if scale is None else float(scale)
    if (_resolve(path) == "avx512bf16" and k.shape[1] > 0
            and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (q, k, v))
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        try:
            return _State.ops.vision_attention(q, k, v, scale, _PATH_ID["avx512bf16"])
        except RuntimeError as exc:     # not expected: the checks above mirror the operator's
            if not getattr(_State, "attention_warned", False):
                _State.attention_warned = True
                logger.warning("internvl_runtime.kernels: vision_attention failed (%s); using torch's SDPA",
                               _summary(exc))
    out = F.scaled_dot_product_attention(q.float().transpose(1, 2), k.float().transpose(1, 2),
                                         v.float().transpose(1, 2), scale=scale)
    return out.transpose(1, 2).reshape(n, length, heads * dim).to(q.dtype)
