"""The native library: built and loaded once, and which instruction-set path each call takes.

The extension (``csrc/*.cpp``) is compiled just in time on the first call (about 10-20 s with 2 cores,
once per host: it is cached under torch's extensions folder, ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). Processes starting together (tensor-parallel ranks) build once: the others
wait for the build lock at most ``$INTERNVL_KERNEL_BUILD_TIMEOUT`` seconds (default 300), then fall back
to torch with a warning; see ``build.py``. One binary serves every x86-64 CPU: each ISA path is compiled
with a per-function target and the path is chosen here from /proc/cpuinfo, so no host ever executes an
instruction it lacks. Without a compiler / ninja, on a non-x86 CPU, or on any build error, every operator
falls back to torch (``ops.py``), and the reason is logged once and shown by ``describe()``.

``INTERNVL_CPU_KERNEL=torch|avx2|avx512|avx512bf16`` forces a path (tests, benchmarks); forcing one the
CPU cannot run raises ``UnsupportedFeature`` naming the missing instruction set. Importing this module
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

from ..errors import UnsupportedFeature
from ..hardware import cpu_flags
from . import build
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


# ---------------------------------------------------------------------------------- loading

class _State:
    lock = threading.Lock()
    ops: Any = None                 # torch.ops.internvl_kernels once loaded
    tried = False
    error: str | None = None        # why the extension is unusable (logged once)
    build_seconds: float | None = None
    library: str | None = None
    best = "torch"                  # the automatic choice, fixed once the extension is loaded
    attention_warned = False        # ops.vision_attention fell back after a native failure (logged once)


def _compile() -> str:
    """Build (or reuse the cached build of) the extension and load it; returns the .so path."""
    return build.compile_extension()


def _summary(exc: BaseException) -> str:
    """A build error in a few lines: its first line and the last lines (where the compiler says why)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 5:
        lines = [lines[0][:300], "...", *lines[-3:]]
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
    register("internvl_kernels::linear_f32")(fake)
    register("internvl_kernels::linear_int8")(fake)
    register("internvl_kernels::linear_int4")(fake)

    def fake_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any) -> torch.Tensor:
        return q.new_empty((q.shape[0], q.shape[1], q.shape[2] * q.shape[3]))

    register("internvl_kernels::vision_attention")(fake_attention)
    register("internvl_kernels::causal_attention")(fake_attention)


def _reset_for_tests() -> None:
    """Forget a failed or disabled build (a loaded library stays loaded: it cannot be unloaded)."""
    with _State.lock:
        if _State.ops is None:
            _State.tried = False
            _State.error = None


def has_operator(name: str) -> bool:
    """Whether the native library is loaded here and registers operator ``name`` (compiles if needed)."""
    return _load() is not None and hasattr(_State.ops, name)


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
