"""Checkpoint tensors as read-only views of their safetensors file (``mmap``), instead of copies.

Where a weight's stored format is the format it is computed in (its dtype on the CPU, no quantization, no
fusing or reshaping transform), the loader can make the parameter a view of the file's mapping: no copy in
the process's anonymous memory, the pages shared with the page cache and with every other process that maps
the same file (an image worker and a decode worker), read from disk only when first touched. This is what
llama.cpp does by default (``--no-mmap`` turns it off there and here).

The mapping is read-only (``PROT_READ``, ``MAP_SHARED``): nothing in the runtime writes weights in place
(tying assigns the same parameter, quantization builds new tensors from the weights, the native decode
stack reads them), and a write to a mapped weight faults (SIGSEGV, the process stops loudly) instead of
changing the file on disk. A tensor keeps its mapping alive (``torch.frombuffer`` holds the buffer); the
mapping is closed when the last tensor viewing it is freed.

A tensor is mapped only where its bytes can be viewed as they are: a whole safetensors tensor, at an offset
that is a multiple of its element size (safetensors' writer aligns every tensor; another writer may not),
with at least one element. Anything else is read as before (``weights.loader``).
"""

from __future__ import annotations

import mmap
import warnings
from pathlib import Path

import torch


class FileMappings:
    """One read-only mapping per checkpoint file, opened on first use; ``view`` returns tensors over them.

    Example::

        mappings = FileMappings()
        weight = mappings.view(Path("model.safetensors"), offset, torch.bfloat16, (896, 896))
        mappings.release()          # the views keep their mapping; only this object's handles go
    """

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}
        self.nbytes = 0            # bytes of every view handed out

    def view(self, file: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...] | list[int]
             ) -> torch.Tensor | None:
        """The tensor of ``dtype`` and ``shape`` at byte ``offset`` of ``file``, viewing the mapping (no copy);
        None when it cannot be viewed in place (empty, or an offset not aligned to its element size)."""
        count = torch.Size(shape).numel()
        itemsize = torch.empty((), dtype=dtype).element_size()
        if count == 0 or offset % itemsize:
            return None
        mapping = self._maps.get(file)
        if mapping is None:
            with open(file, "rb") as f:
                mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[file] = mapping
        if offset + count * itemsize > len(mapping):
            return None
        with warnings.catch_warnings():     # torch warns that the buffer is not writable: that is the point
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset)
        self.nbytes += count * itemsize
        return flat.view(tuple(shape))

    def release(self) -> None:
        """Drop this object's references to the mappings (each stays open while a view of it lives)."""
        self._maps.clear()


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges [start, end) of this process's mappings of ``path`` (Linux ``/proc/self/maps``;
    empty elsewhere): how a test or a benchmark tells a mapped weight from a copy."""
    target = str(Path(path).resolve())
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].strip() == target:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def is_mapped_from(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether ``tensor``'s bytes lie inside one of ``ranges`` (see :func:`mapped_ranges`)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(lo <= start and end <= hi for lo, hi in ranges)
