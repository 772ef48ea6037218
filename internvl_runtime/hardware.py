"""What the host can compute fast: CPU instruction sets, CUDA, and the defaults that follow from it (the
dtype and device "auto" resolve to, ``max_num_seqs``). Decisions are pure functions of the facts passed in
(a compute capability, whether CUDA is available), so they are tested without a GPU.

On x86 CPUs without avx512_bf16/AMX, torch's bfloat16 matrix products run far slower than float32
(``benchmarks/upcast_plan.py`` measures it), so "auto" picks float32 there.
"""

from __future__ import annotations

import functools
import os
import platform

import torch

INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                     "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where unavailable)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable; free pages where /proc is absent)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool:
    flags = cpu_flags()
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "bf16" in flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def describe_host() -> str:
    """One line for benchmark records: CPU model, relevant flags, torch's CPU capability, threads."""
    flags = " ".join(f for f in INTERESTING_FLAGS if f in cpu_flags()) or "none"
    return (f"{cpu_model()} | flags: {flags} | torch {torch.__version__} capability "
            f"{torch.backends.cpu.get_cpu_capability()} | threads {torch.get_num_threads()}")


#: The first CUDA compute capability with bfloat16 arithmetic (Ampere, sm80).
CUDA_BF16_CAPABILITY = (8, 0)
_DTYPE_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cuda_supports_bf16(capability: tuple[int, int]) -> bool:
    """Whether a CUDA device of compute ``capability`` (major, minor) computes in bfloat16 (sm80+)."""
    return tuple(capability) >= CUDA_BF16_CAPABILITY


def cuda_auto_dtype(checkpoint_dtype: str | None, capability: tuple[int, int]) -> torch.dtype:
    """The dtype "auto" resolves to on a CUDA device of compute ``capability``: the checkpoint's (bfloat16
    for InternVL2), except bfloat16 below sm80, which becomes float16 (vLLM's fallback too: Volta and Turing
    GPUs compute fp16 natively; its narrower range can overflow where bf16 would not, so float32 stays the
    choice to ask for if a model's answers break in fp16)."""
    wanted = _DTYPE_NAMES.get(checkpoint_dtype or "float32", torch.float32)
    if wanted == torch.bfloat16 and not cuda_supports_bf16(capability):
        return torch.float16
    return wanted


def auto_dtype(checkpoint_dtype: str | None, device: torch.device,
               capability: tuple[int, int] | None = None) -> torch.dtype:
    """The dtype "auto" resolves to: the checkpoint's, unless the device cannot compute it (fast).

    CUDA: ``cuda_auto_dtype`` with the device's compute ``capability`` (read from the device when not
    given). CPU: float32 instead of 16-bit without avx512_bf16/AMX (or arm bf16)."""
    if device.type == "cuda":
        return cuda_auto_dtype(checkpoint_dtype, capability or torch.cuda.get_device_capability(device))
    wanted = _DTYPE_NAMES.get(checkpoint_dtype or "float32", torch.float32)
    if device.type == "cpu" and wanted in (torch.bfloat16, torch.float16) and not cpu_has_fast_bf16():
        return torch.float32
    return wanted


def default_device(cuda_available: bool) -> str:
    """The device "auto" (or no device) means for ``internvl serve``, ``internvl chat`` / ``generate`` and
    LMDeploy's ``pipeline``: ``cuda`` when torch sees a CUDA device, else ``cpu``. (``AutoModel`` keeps the
    official semantics instead: the CPU until ``.cuda()`` or a ``device_map``.) Callers pass
    ``torch.cuda.is_available()``."""
    return "cuda" if cuda_available else "cpu"


#: ``max_num_seqs`` when none is given, by device type: a GPU step costs about the same for 1 or 256
#: sequences (memory-bound decode), a CPU step grows with every row.
DEFAULT_MAX_NUM_SEQS = {"cuda": 256, "cpu": 16}


def default_max_num_seqs(device_type: str) -> int:
    """Sequences decoded together when ``max_num_seqs`` is not given: 256 on a GPU (vLLM's default), 16
    elsewhere (the CPU)."""
    return DEFAULT_MAX_NUM_SEQS.get(device_type, DEFAULT_MAX_NUM_SEQS["cpu"])
