"""Weights the loader allocates on the CPU (a fused q/k/v or gate/up weight; every weight with ``mmap=False``) live,
from ``HUGE_PAGE_BYTES`` on, in an anonymous mapping of their own advised for transparent huge pages; scratch
weights (quantized at load) and small ones do not. Checked on the mapping's VmFlags ("hg": MADV_HUGEPAGE)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from internvl_runtime.weights.direct import allocate
from internvl_runtime.weights.mapping import HUGE_PAGE_BYTES, anonymous_empty

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vm_flags(tensor: torch.Tensor) -> list[str] | None:
    """The VmFlags of the mapping holding ``tensor``'s first byte (/proc/self/smaps), None if none holds it."""
    address = tensor.data_ptr()
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    return None


@pytest.fixture(autouse=True)
def _linux_thp() -> None:
    if not THP.exists() or "[never]" in THP.read_text():
        pytest.skip("no transparent huge pages on this kernel")


def test_anonymous_empty_advises_when_asked() -> None:
    shape = (HUGE_PAGE_BYTES // 2 * 2, 1)       # 4 MiB of bf16
    advised = anonymous_empty(shape, torch.bfloat16, huge_pages=True)
    plain = anonymous_empty(shape, torch.bfloat16)
    assert "hg" in (_vm_flags(advised) or [])
    assert "hg" not in (_vm_flags(plain) or [])
    advised.fill_(1.5)                          # an ordinary writable tensor
    assert float(advised.float().sum()) == 1.5 * advised.numel()


def test_allocate_advises_big_weights_only() -> None:
    with torch.device("meta"):
        module = nn.Module()
        module.big = nn.Parameter(torch.empty(HUGE_PAGE_BYTES // 2, 2, dtype=torch.bfloat16))
        module.small = nn.Parameter(torch.empty(1000, 16, dtype=torch.bfloat16))
        module.scratch = nn.Parameter(torch.empty(HUGE_PAGE_BYTES // 2, 2, dtype=torch.bfloat16))
    allocate(module, ["big", "small"], torch.device("cpu"))
    allocate(module, ["scratch"], torch.device("cpu"), scratch=True)
    assert module.big.device.type == "cpu" and module.big.shape == (HUGE_PAGE_BYTES // 2, 2)
    assert "hg" in (_vm_flags(module.big) or [])
    assert "hg" not in (_vm_flags(module.small) or [])
    assert "hg" not in (_vm_flags(module.scratch) or [])
