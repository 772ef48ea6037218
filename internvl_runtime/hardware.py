"""What the host can compute fast: CPU instruction sets, CUDA, and the dtype to use for "auto".

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


def auto_dtype(checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """The dtype "auto" resolves to: the checkpoint's, unless the device cannot compute it fast."""
    names = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    wanted = names.get(checkpoint_dtype or "float32", torch.float32)
    if device.type == "cpu" and wanted in (torch.bfloat16, torch.float16) and not cpu_has_fast_bf16():
        return torch.float32
    return wanted
