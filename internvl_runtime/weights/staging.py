"""Host -> device copies of checkpoint tensors through one reused host buffer, pinned for CUDA.

A copy from pageable memory to a GPU goes through a driver bounce buffer, synchronously, one chunk at a
time. ``StagingBuffer`` reads each checkpoint tensor straight from the file into one host buffer it keeps
(page-locked when the target is CUDA; when the checkpoint's dtype differs from the target's, the tensor is
read, then cast into the buffer) and starts an asynchronous copy from there; before the buffer is written
again it waits for that copy (one CUDA event). The buffer grows to the largest tensor seen, so host memory
for the whole load is about one tensor (two when a cast is needed).

Targets on the CPU need no staging: the tensor is read (or cast) straight into its destination. ``stage_cpu=True``
routes CPU targets through the buffer as well (unpinned), which is how the CPU test suite checks the
staged path's casts and buffer reuse.
"""

from __future__ import annotations

import torch

from .loader import LazyTensor


def _loaded(src: torch.Tensor | LazyTensor) -> torch.Tensor:
    return src.load() if isinstance(src, LazyTensor) else src


def pins_for(device: torch.device) -> bool:
    """Whether copies to ``device`` stage through page-locked host memory (CUDA only: pinning needs the
    CUDA driver, and only its copies become asynchronous from it)."""
    return device.type == "cuda"


class StagingBuffer:
    """``copy(dest, src)``: ``src`` (a host tensor, or a checkpoint tensor not read yet) into ``dest`` (any
    device), cast to ``dest``'s dtype, bit for bit what ``dest.copy_(src.to(dest.dtype))`` gives. Call
    ``synchronize()`` before reading the destinations on the host or dropping the buffer early; a CUDA copy
    is otherwise still in flight.

    Example::

        staging = StagingBuffer()
        for name, tensor in checkpoint:
            staging.copy(params[name], tensor)
        staging.synchronize()
    """

    def __init__(self, *, stage_cpu: bool = False) -> None:
        self.stage_cpu = stage_cpu
        self._buffer: torch.Tensor | None = None    # uint8 bytes, viewed as each tensor's dtype and shape
        self._pending: torch.cuda.Event | None = None
        self.staged = 0                              # how many copies went through the buffer

    @property
    def capacity(self) -> int:
        """Bytes of the host buffer (0 before the first staged copy)."""
        return 0 if self._buffer is None else self._buffer.numel()

    def copy(self, dest: torch.Tensor, src: torch.Tensor | LazyTensor) -> None:
        """``src``: a host tensor, or a checkpoint tensor not read yet (then read straight into ``dest`` or
        the buffer when the dtypes agree: the tensor is in host memory once)."""
        if dest.device.type == "meta":
            return
        if dest.device.type == "cpu" and not self.stage_cpu:
            if isinstance(src, LazyTensor) and src.read_into(dest):
                return
            dest.copy_(_loaded(src).to(dtype=dest.dtype))
            return
        self.synchronize()                          # the previous copy out of the buffer is done
        staged = self._view(torch.Size(src.shape), dest.dtype, pin=pins_for(dest.device))
        if not (isinstance(src, LazyTensor) and src.read_into(staged)):
            staged.copy_(_loaded(src))              # the cast happens here, on the host
        asynchronous = staged.is_pinned()
        dest.copy_(staged, non_blocking=asynchronous)
        if asynchronous:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dest.device))
            self._pending = event
        self.staged += 1

    def synchronize(self) -> None:
        """Wait for the copy in flight, if any."""
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None

    def release(self) -> None:
        """Wait, then drop the host buffer (a pinned one back to the OS, not to torch's pinned-memory cache)."""
        self.synchronize()
        self._drop()

    def _drop(self) -> None:
        pinned = self._buffer is not None and self._buffer.is_pinned()
        self._buffer = None
        if pinned:      # torch caches freed pinned blocks for reuse: hand them back, or they stay resident
            empty_host_cache = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
            if empty_host_cache is not None:    # torch >= 2.8
                empty_host_cache()

    def _view(self, shape: torch.Size, dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
        nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
        buffer = self._buffer
        if buffer is None or buffer.numel() < nbytes or (pin and not buffer.is_pinned()):
            self._drop()                            # the old one goes before the bigger one is allocated
            buffer = self._buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        return buffer[:nbytes].view(dtype).view(shape)
