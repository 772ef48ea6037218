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

A view can also be read once and let go (``drop_pages``): a weight that is quantized at load is read from its
view, and the pages it touched are then taken out of this process (``MADV_DONTNEED`` on a read-only shared
file mapping: the page cache keeps them, a later read of the same bytes faults them in again from the file),
so the 16-bit weight never becomes a copy in the process and its file pages do not stay resident either.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import warnings
from collections.abc import Callable
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
        self._bases: dict[Path, int] = {}       # the address each mapping starts at
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._bases[file] = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
        if offset + count * itemsize > len(mapping):
            return None
        with warnings.catch_warnings():     # torch warns that the buffer is not writable: that is the point
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset)
        self.nbytes += count * itemsize
        return flat.view(tuple(shape))

    def drop_pages(self, tensor: torch.Tensor) -> int:
        """Take the pages under ``tensor``'s bytes (a view of one of these mappings; anything else is left alone)
        out of this process's resident memory; returns the bytes of those pages, up to the end of the file (0: not
        a view of ours, or no ``madvise`` here). The bytes stay readable: a later access faults them in again from
        the file, so a page shared with a neighbouring tensor that stays in use costs that tensor a fault, never
        its data."""
        nbytes = tensor.numel() * tensor.element_size()
        start = tensor.data_ptr()
        if nbytes == 0 or tensor.device.type != "cpu" or not hasattr(mmap, "MADV_DONTNEED"):
            return 0
        for file, mapping in self._maps.items():
            base = self._bases[file]
            if base <= start and start + nbytes <= base + len(mapping):
                lo = (start - base) // mmap.PAGESIZE * mmap.PAGESIZE
                hi = min(-(-(start - base + nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE, len(mapping))
                mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                return hi - lo
        return 0

    def release(self) -> None:
        """Drop this object's references to the mappings (each stays open while a view of it lives)."""
        self._maps.clear()
        self._bases.clear()


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges [start, end) of this process's mappings of ``path`` (Linux ``/proc/self/maps``;
    empty elsewhere): how a test or a benchmark tells a mapped weight from a copy."""
    target = str(Path(path).resolve())
    return _file_ranges(lambda name: name == target)


def checkpoint_mappings() -> list[tuple[int, int]]:
    """The address ranges [start, end) of this process's mappings of ``*.safetensors`` files (as ``mapped_ranges``)."""
    return _file_ranges(lambda name: name.endswith(".safetensors"))


def _file_ranges(wanted: Callable[[str], bool]) -> list[tuple[int, int]]:
    """/proc/self/maps' ranges of the files ``wanted`` picks, adjacent ones merged (advice on part of a mapping,
    ``advise_sparse``, splits it in several)."""
    ranges: list[tuple[int, int]] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and wanted(parts[5].strip()):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    if ranges and ranges[-1][1] == start:
                        ranges[-1] = (ranges[-1][0], end)
                    else:
                        ranges.append((start, end))
    except OSError:
        return []
    return ranges


def is_mapped_from(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether ``tensor``'s bytes lie inside one of ``ranges`` (see :func:`mapped_ranges`)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    return any(lo <= start and end <= hi for lo, hi in ranges)


#: Bytes from which a CPU weight allocated at load lives in an anonymous mapping advised for huge pages
#: (``weights.direct.allocate``): one transparent huge page.
HUGE_PAGE_BYTES = 2 << 20


def advise_sparse(tensor: torch.Tensor) -> bool:
    """Advise the pages under ``tensor`` (CPU memory: a view of a checkpoint's mapping) against huge pages
    (``MADV_NOHUGEPAGE``, Linux): for memory read a little at a time (an embedding whose LM head is a quantized
    copy, or untied; a norm or a bias between weights quantized and dropped). A file cached in 2 MiB folios (Linux
    6.x reads ext4 / xfs files into large folios) is otherwise mapped 2 MiB at a time, and every row or norm read
    makes its 2 MiB resident (InternVL2-1B int8: ~0.1 GiB more, RESULTS.md). Returns whether the advice was
    taken."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0 or tensor.device.type != "cpu" or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return False
    start = tensor.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    length = -(-(tensor.data_ptr() + nbytes - start) // mmap.PAGESIZE) * mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), mmap.MADV_NOHUGEPAGE) == 0


def streamed_empty(shape: tuple[int, ...] | list[int] | torch.Size, dtype: torch.dtype,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised tensor for a weight that decode steps read whole (an int8 / int4 weight, a fused one): on
    the CPU from ``HUGE_PAGE_BYTES`` on in an anonymous mapping advised for huge pages
    (``anonymous_empty(huge_pages=True)``), else ``torch.empty``."""
    if torch.device(device).type == "cpu" and torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size() \
            >= HUGE_PAGE_BYTES:
        return anonymous_empty(shape, dtype, huge_pages=True)
    return torch.empty(shape, dtype=dtype, device=device)


def anonymous_empty(shape: tuple[int, ...] | list[int] | torch.Size, dtype: torch.dtype, *,
                    huge_pages: bool = False) -> torch.Tensor:
    """An uninitialised CPU tensor in a private anonymous mapping of its own, unmapped when the tensor is freed.

    For a short-lived large tensor (a fused 16-bit weight assembled only to be quantized): its memory goes back to
    the OS as soon as it is freed, and it never passes through ``malloc``, whose heap would otherwise keep it (glibc
    raises its mmap threshold to the size of each mapped block freed, so every later block up to that size, a
    prefill's temporaries among them, is carved from the heap and stays resident once freed).

    ``huge_pages``: the mapping is advised for transparent huge pages (``MADV_HUGEPAGE``, where Linux has them in
    ``madvise`` or ``always`` mode), for a long-lived weight that every decode step streams whole: with 2 MiB pages
    the hardware prefetcher is not stopped at every 4 KiB page boundary and the stream needs 512x fewer TLB walks
    (InternVL2-1B's fused q/k/v and gate/up weights, ~470 MB: batch-1 bf16 decode ~8% faster, RESULTS.md). Not for
    memory read sparsely (an embedding table's rows), where each row touched would make 2 MiB resident."""
    count = torch.Size(shape).numel()
    itemsize = torch.empty((), dtype=dtype).element_size()
    buffer = mmap.mmap(-1, max(count * itemsize, 1), flags=mmap.MAP_PRIVATE)   # anonymous, private
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        # a kernel without transparent huge pages refuses: 4 KiB pages, as without the advice
        with contextlib.suppress(OSError):
            buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(tuple(shape))
