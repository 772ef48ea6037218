"""The tensor-parallel process group: who we are, how to talk, and how long to wait.

One group of ``world_size`` ranks, all holding a slice of the same model (tensor parallelism only; no
pipeline or data parallelism inside a group: replicas are separate servers, see docs/scaling.md).
Two process groups over the same ranks:

- ``device_group``: the model's collectives (all-reduce after row-parallel layers, all-gather of the
  vocabulary-parallel logits). NCCL on GPUs, gloo on CPUs.
- ``control_group``: the lock-step messages rank 0 sends the workers (the step's token ids, positions,
  block tables; heartbeats; stop). Always gloo, so these small pickled messages never go through a GPU.

Every collective has a timeout (``timeout_s``, from ``init_process_group(timeout=...)``): a rank that dies
makes the others raise :class:`TensorParallelError` (gloo notices a closed connection at once; NCCL's
watchdog after the timeout) instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ConfigError, TensorParallelError

#: Default seconds a collective may wait (first message waits for the slowest rank's weight loading).
DEFAULT_TIMEOUT_S = float(os.environ.get("INTERNVL_TP_TIMEOUT_S", "600"))


@dataclass
class TPGroup:
    """This process's place in the tensor-parallel group (``world_size == 1``: no group at all)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    device_group: dist.ProcessGroup | None = None
    control_group: dist.ProcessGroup | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_driver(self) -> bool:
        """Rank 0 runs the scheduler, the vision encoder, sampling and (when serving) HTTP."""
        return self.rank == 0

    # -- collectives on the model's activations ------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (the partial sums of a row-parallel layer)."""
        if self.world_size > 1:
            _guard(lambda: dist.all_reduce(x, group=self.device_group), "all_reduce")
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n) per rank -> (..., world_size * n), rank order along the last dim."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        _guard(lambda: dist.all_gather(parts, x, group=self.device_group), "all_gather")
        return torch.cat(parts, dim=-1)

    # -- control messages (rank 0 -> workers) ------------------------------------------------------
    def broadcast_object(self, obj: object = None) -> object:
        """Rank 0's ``obj`` on every rank (pickled; tensors must be on the CPU)."""
        box = [obj]
        _guard(lambda: dist.broadcast_object_list(box, src=0, group=self.control_group), "broadcast")
        return box[0]

    def broadcast_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's tensor into ``x`` (same shape and dtype on every rank) over the device group."""
        _guard(lambda: dist.broadcast(x, src=0, group=self.device_group), "broadcast")
        return x

    def barrier(self) -> None:
        """All ranks meet (a peer already gone is not waited for)."""
        if self.world_size > 1 and dist.is_initialized():
            with contextlib.suppress(RuntimeError, dist.DistBackendError):
                dist.barrier(group=self.control_group)

    def destroy(self) -> None:
        """Leave the group. All ranks meet first: gloo can abort the process (std::terminate) when a
        peer tears its connections down while this rank's are still in use."""
        if self.world_size > 1 and dist.is_initialized():
            self.barrier()
            dist.destroy_process_group()


def _guard(fn: Callable[[], object], what: str) -> None:
    try:
        fn()
    except TensorParallelError:
        raise
    except (RuntimeError, dist.DistBackendError, ConnectionError, OSError) as exc:
        raise TensorParallelError(f"tensor-parallel {what} failed: a rank of the group died or timed out "
                                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                  "stopping the whole group") from exc


def env_world() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun's environment, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
    except ValueError as exc:
        raise ConfigError(f"torchrun environment is malformed ({exc})") from exc


def check_launch(tensor_parallel_size: int, world_size: int, *, device: str,
                 local_world_size: int | None = None) -> None:
    """Start-up checks that need no weights: the group size, and devices for every local rank."""
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ConfigError(f"tensor_parallel_size must be an integer >= 1, got {tensor_parallel_size!r}")
    if world_size != tensor_parallel_size:
        raise ConfigError(f"--tensor-parallel-size {tensor_parallel_size} but the launcher started {world_size} "
                          f"processes in all (WORLD_SIZE, over every node): they must be equal; check "
                          "--nproc-per-node x --nnodes on every node")
    if device.startswith("cuda"):
        local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local > have:
            raise ConfigError(f"{local} tensor-parallel ranks on this node but only {have} CUDA device(s): "
                              "one GPU per rank is needed (lower --nproc-per-node)")


def init_group(*, rank: int, world_size: int, local_rank: int = 0, device: str = "cpu",
               init_method: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> TPGroup:
    """Join the group (``init_method`` None: torchrun's env:// rendezvous). NCCL for CUDA, else gloo."""
    if world_size == 1:
        return TPGroup(device=torch.device(device))
    cuda = device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
        # NCCL aborts a collective whose peer died after ``timeout`` rather than hanging forever.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    try:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method or "env://", rank=rank,
                                world_size=world_size, timeout=timeout)
    except (RuntimeError, ValueError, dist.DistStoreError) as exc:
        raise TensorParallelError(f"rank {rank} could not join the tensor-parallel group of {world_size} "
                                  f"({exc})") from exc
    device_group = dist.group.WORLD
    control_group = dist.new_group(backend="gloo", timeout=timeout) if cuda else device_group
    return TPGroup(rank=rank, world_size=world_size, device=dev, device_group=device_group,
                   control_group=control_group, timeout_s=timeout_s)
