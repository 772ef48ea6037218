"""What the Triton kernels share: whether triton is there, and loading a kernel module on first use.

Importing this module never imports triton; ``triton_available`` tries once. The ``_triton_*_kernel``
modules import triton at their top and define the ``@triton.jit`` functions, so they are loaded only when
a kernel is about to run (``load``). Each records ``INTERPRETED``: whether ``triton.jit`` wrapped its
kernels in triton's CPU interpreter (``TRITON_INTERPRET=1`` when the module was loaded).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from types import ModuleType

import torch


@functools.lru_cache(maxsize=1)
def _triton() -> ModuleType | None:
    try:
        return importlib.import_module("triton")
    except ImportError:
        return None


def triton_available() -> bool:
    """Whether triton can be imported (checked once, on the first call)."""
    return _triton() is not None


@functools.cache
def load(name: str) -> ModuleType:
    """The kernel module ``internvl_runtime.kernels.<name>`` (imports triton; call after ``triton_available``)."""
    return importlib.import_module(f".{name}", __package__)


def runs_on(device: torch.device, name: str) -> bool:
    """Whether the kernels of module ``name`` run for tensors on ``device``: triton is installed and either
    ``device`` is a GPU or triton interprets kernels (then on any device, the CPU included)."""
    if not triton_available():
        return False
    return device.type == "cuda" or bool(load(name).INTERPRETED)


@dataclass(frozen=True)
class KernelCall:
    """One launch of a ``@triton.jit`` function, built from host values only: the function's name in its
    kernel module, the grid, the positional arguments and the compile-time constants. Kept as data so
    that the tests can compile exactly what a launch would for a GPU target, on a machine without one."""

    kernel: str
    grid: tuple[int, ...]
    args: tuple[object, ...]
    constants: dict[str, object]

    def launch(self, module: ModuleType) -> None:
        """Run the kernel of that name in ``module`` (a loaded kernel module) with this grid and arguments."""
        # fused multiply-adds: triton's default, stated (left unset, triton 3.9 warns at the first compile)
        getattr(module, self.kernel)[self.grid](*self.args, **self.constants, enable_fp_fusion=True)
