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
    assert module.small.untyped_storage().resizable()      # torch's own allocation, where malloc puts it
    assert "hg" not in (_vm_flags(module.scratch) or [])


def test_streamed_weights_of_quantized_layers() -> None:
    """int8 / int4 weights, made at load, are streamed memory too (from 2 MiB on)."""
    from internvl_runtime.weights.mapping import streamed_empty

    big = streamed_empty((HUGE_PAGE_BYTES,), torch.int8)
    small = streamed_empty((1000,), torch.int8)
    assert "hg" in (_vm_flags(big) or []) and small.untyped_storage().resizable()
    from internvl_runtime.quantization.linear import quantize_int8
    q, _ = quantize_int8(torch.randn(2048, 1024).bfloat16())
    assert "hg" in (_vm_flags(q) or [])


@pytest.mark.parametrize(("fixture", "quantization", "sparse"), [
    ("tiny-3_5-1B", None, False),       # tied: the embedding is the LM head's weight, streamed whole
    ("tiny-3_5-1B", "int8", True),      # tied, the head an int8 copy: the table is only looked up
    ("tiny-1B", None, True),            # untied: looked up only
])
def test_embedding_read_sparsely_is_advised_against_huge_pages(fixture: str, quantization: str | None,
                                                               sparse: bool) -> None:
    """An embedding table no linear layer streams is looked up a row at a time: its file pages are advised
    against huge pages ("nh"); one that is its LM head's weight is streamed whole: not."""
    from internvl_runtime import loading
    from paths import FIXTURES

    model = loading.load_model(FIXTURES / "ckpt" / fixture, dtype=torch.float32, quantization=quantization)
    table = model.language_model.get_input_embeddings().weight
    flags = _vm_flags(table) or []
    assert "mr" in flags and "wr" not in flags, flags       # a read-only view of the checkpoint's mapping
    assert ("nh" in flags) == sparse, flags
    norm = model.language_model.model.norm.weight           # read a few KiB at a time: never in a huge page
    assert "nh" in (_vm_flags(norm) or []), _vm_flags(norm)
