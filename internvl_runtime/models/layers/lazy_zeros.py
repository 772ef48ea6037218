"""Zero-filled CPU tensors whose pages become resident only when first written: the KV pool's memory.

``torch.zeros`` on the CPU allocates and then writes every byte, so the whole pool is resident from the
start: on ``internvl serve``'s CPU default (a quarter of the memory available) that is gigabytes before the
first request. A private anonymous mapping reads as zeros without being written (the kernel maps its shared
zero page), and each page joins the process's resident memory when a token's keys or values are first
stored in it: the pool costs what the requests have used, as llama.cpp's buffers do not until touched.

The mapping belongs to the tensor (``torch.frombuffer`` keeps the buffer alive) and is unmapped when the
last view of it is freed. Other devices get ``torch.zeros``.
"""

from __future__ import annotations

import mmap

import torch


def lazy_zeros(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` on ``device`` reading as zeros; on the CPU its pages are allocated
    on first write (see the module docstring), elsewhere as ``torch.zeros`` allocates them."""
    device = torch.device(device)
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes == 0 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype, device=device)
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)
