"""Starting a tensor-parallel group: torchrun, or processes we spawn ourselves for offline use.

Server, one machine (rank 0 serves HTTP, all ranks run the model)::

    torchrun --nproc-per-node 2 -m internvl_runtime serve pretrained/InternVL2-26B --tensor-parallel-size 2

Across machines (run on each node; torchrun's rendezvous assigns the ranks)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29400 \\
        -m internvl_runtime serve pretrained/InternVL2-Llama3-76B --tensor-parallel-size 16

Offline, no launcher (rank 0 is this process; the others are spawned and follow it)::

    pipe = pipeline("pretrained/InternVL2-26B", tensor_parallel_size=2)

Order at start-up, on every rank: check the sizes against the config and the launcher (a bad size is a
``ConfigError`` before any weight is read), join the group, build the local-size model on the meta
device, read this rank's slices. Then rank 0 builds the engine and the workers enter ``run_worker``.
Every rank loads through the one loader (``loading.load_model``, rank 0 through
``LLMEngine.from_pretrained``) with :func:`tensor_parallel_builder` as its builder; rank 0's engine gets
its runner wrapped in a :class:`TensorParallelRunner`.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import InternVLConfig
from ..engine.async_engine import AsyncEngine
from ..engine.engine import EngineConfig, LLMEngine
from ..engine.model_runner import ModelRunner
from ..loading import DTypeSpec, LoadPlan, ModelBuilder, load_model, read_checkpoint
from ..models.internvl import InternVLModel
from ..weights.loader import Progress
from .layers import (
    check_family,
    check_tensor_parallel,
    make_tensor_parallel,
    shard_plan,
    tp_resolver,
)
from .parallel_state import (
    DEFAULT_TIMEOUT_S,
    TensorParallelError,
    TPGroup,
    check_launch,
    env_world,
    init_group,
)
from .worker import TensorParallelRunner, run_worker

logger = logging.getLogger(__name__)


def build_tensor_parallel_model(folder: str | Path, group: TPGroup, *, dtype: torch.dtype = torch.float32,
                                config: InternVLConfig | None = None, model_class: type[InternVLModel] = InternVLModel,
                                progress: Progress | None = None) -> InternVLModel:
    """This rank's model: the decoder's slices (see ``layers.py``); on rank 0 also the vision encoder and
    ``mlp1`` (workers leave them on the meta device, unallocated and unread). ``progress(nbytes)`` after
    each checkpoint tensor."""
    config = config or InternVLConfig.from_pretrained(folder)
    plan = shard_plan(config.llm, group.world_size, group.rank)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(config)
            check_family(model.language_model)
            make_tensor_parallel(model.language_model, plan, group)
    finally:
        torch.set_default_dtype(previous)
    if group.is_driver:
        model.to_empty(device=group.device)
    else:
        model.language_model.to_empty(device=group.device)
    read_checkpoint(model, Path(folder), resolve=tp_resolver(model.resolve_checkpoint_name, model.language_model, plan),
                    skip=lambda n: not group.is_driver and not n.startswith("language_model."), progress=progress)
    return model.eval().requires_grad_(False)


def tensor_parallel_builder(group: TPGroup) -> ModelBuilder:
    """The ``build`` for ``loading.load_model``: this rank's slices only (:func:`build_tensor_parallel_model`)."""
    def build(plan: LoadPlan, progress: Progress | None) -> InternVLModel:
        return build_tensor_parallel_model(plan.folder, group, dtype=plan.dtype, config=plan.config, progress=progress)
    return build


def resident_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this process actually holds (meta tensors excluded, tied counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.device.type == "meta" or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


@dataclass
class DrivingRank:
    """Rank 0 after loading: its engine, and the runner in it that drives the workers."""

    engine: LLMEngine
    runner: TensorParallelRunner


def start_rank(folder: str | Path, group: TPGroup, *, dtype: DTypeSpec = "auto",
               engine_config: EngineConfig | None = None,
               on_failure: Callable[[BaseException], None] | None = None,
               progress: bool = False) -> DrivingRank | None:
    """Load this rank's slices; rank 0 returns its engine, whose runner drives the workers; a worker runs
    the lock-step loop until rank 0 stops it and returns None. ``progress``: rank 0's weight bar."""
    check_tensor_parallel(InternVLConfig.from_pretrained(folder), group.world_size)
    build = tensor_parallel_builder(group)
    if not group.is_driver:
        model = load_model(folder, dtype=dtype, device_map=group.device, build=build)
        _log_resident(group, model)
        run_worker(model, group)
        return None

    runners: list[TensorParallelRunner] = []

    def driving_runner(model: InternVLModel, **kwargs: Any) -> TensorParallelRunner:
        """Rank 0's runner: the local ModelRunner, each step broadcast to the workers first; eager, as the
        workers' (the all-reduces between sliced layers are not captured in CUDA graphs)."""
        kwargs["enforce_eager"] = True
        runners.append(TensorParallelRunner(ModelRunner(model, **kwargs), group, on_failure=on_failure))
        return runners[-1]

    engine = LLMEngine.from_pretrained(folder, dtype=dtype, device=group.device, config=engine_config,
                                       progress=progress, build=build, runner_factory=driving_runner)
    assert len(runners) == 1, "the engine builds one runner"
    _log_resident(group, engine.model)
    return DrivingRank(engine, runners[0])


def _log_resident(group: TPGroup, model: torch.nn.Module) -> None:
    logger.info("rank %d/%d: %.1f MiB of weights resident", group.rank, group.world_size,
                resident_weight_bytes(model) / 2**20)


# ---------------------------------------------------------------------------------------------------
# Spawned workers (offline use without torchrun)
# ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_worker(rank: int, world_size: int, init_method: str, folder: str, dtype: DTypeSpec, device: str,
                    timeout_s: float) -> None:
    logging.basicConfig(level=logging.WARNING)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        group = init_group(rank=rank, world_size=world_size, local_rank=rank, device=device,
                           init_method=init_method, timeout_s=timeout_s)
        start_rank(folder, group, dtype=dtype)
        group.barrier()
    except TensorParallelError as exc:
        print(f"internvl tensor-parallel rank {rank}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    # Leave without running gloo's teardown: it occasionally aborts (std::terminate) in a process that
    # is exiting anyway; the kernel closes the connections.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class SpawnedGroup:
    """Rank 0 here, ranks 1..N-1 in spawned processes; ``close`` stops and joins them."""

    def __init__(self, folder: str | Path, world_size: int, *, dtype: DTypeSpec, device: str,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        import torch.multiprocessing as mp

        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.processes = [ctx.Process(target=_spawned_worker, daemon=True, name=f"internvl-tp-rank{r}",
                                      args=(r, world_size, init_method, str(folder), dtype, device, timeout_s))
                          for r in range(1, world_size)]
        for p in self.processes:
            p.start()
        try:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
            self.group = init_group(rank=0, world_size=world_size, device=device, init_method=init_method,
                                    timeout_s=timeout_s)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        for p in self.processes:
            if p.is_alive():
                p.kill()
            p.join(5)

    def close(self, runner: TensorParallelRunner | None = None) -> None:
        """Stop the workers (through rank 0's ``runner``, when it was built) and the group."""
        if runner is not None:
            runner.close()
            if runner.failed is not None:   # a rank died: nobody to meet, just clean up
                self.kill()
                return
        self.group.destroy()            # meets the workers' own destroy (a barrier), then they exit
        for p in self.processes:
            p.join(30)
        self.kill()


@dataclass
class TensorParallelEngine:
    """Rank 0's side of a tensor-parallel group: the engine, the worker processes this process spawned
    (none under torchrun) and ``close`` (stops the workers and the group; call once)."""

    engine: LLMEngine
    close: Callable[[], None]
    workers: list[BaseProcess] = field(default_factory=list)


def tensor_parallel_engine(folder: str | Path, tensor_parallel_size: int, *, dtype: DTypeSpec = "auto",
                           device: str = "cpu", engine_config: EngineConfig | None = None,
                           timeout_s: float = DEFAULT_TIMEOUT_S) -> TensorParallelEngine:
    """For ``pipeline(..., tensor_parallel_size=N)``: the engine on rank 0, and how to stop the group.

    Under torchrun (``WORLD_SIZE`` set) this process is one rank: a worker runs the lock-step loop and then
    exits the process (``SystemExit(0)``), so the rest of the user's script runs on rank 0 only. Outside
    torchrun, N-1 worker processes are spawned here. Sizes are checked before anything starts."""
    config = InternVLConfig.from_pretrained(folder)
    check_tensor_parallel(config, tensor_parallel_size)
    world = env_world()
    if world is not None:
        rank, world_size, local_rank = world
        check_launch(tensor_parallel_size, world_size, device=device)
        group = init_group(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                           timeout_s=timeout_s)
        rank0 = start_rank(folder, group, dtype=dtype, engine_config=engine_config)
        if rank0 is None:
            group.destroy()
            raise SystemExit(0)
        runner = rank0.runner

        def close() -> None:
            runner.close()
            group.destroy()

        return TensorParallelEngine(rank0.engine, close)
    check_launch(tensor_parallel_size, tensor_parallel_size, device=device, local_world_size=tensor_parallel_size)
    spawned = SpawnedGroup(folder, tensor_parallel_size, dtype=dtype, device=device, timeout_s=timeout_s)
    try:
        driving = start_rank(folder, spawned.group, dtype=dtype, engine_config=engine_config)
    except BaseException:
        spawned.kill()
        raise
    assert driving is not None, "this process is rank 0"
    return TensorParallelEngine(driving.engine, lambda: spawned.close(driving.runner), list(spawned.processes))


# ---------------------------------------------------------------------------------------------------
# Serving under torchrun
# ---------------------------------------------------------------------------------------------------


def _exit_group(exc: BaseException) -> None:
    """A rank died: say so and end this process, so torchrun stops every other rank."""
    print(f"internvl: {exc}", file=sys.stderr, flush=True)
    os._exit(1)


class ServeSettings(Protocol):
    """What :func:`serve_tensor_parallel` reads of the server's config (``serving.ServerConfig``, a layer above)."""

    model: str
    dtype: str
    device: str
    tensor_parallel_size: int
    max_queue_len: int

    def engine_kwargs(self) -> dict[str, Any]: ...


def serve_tensor_parallel(config: ServeSettings, *,
                          timeout_s: float = DEFAULT_TIMEOUT_S) -> Callable[[], AsyncEngine] | None:
    """For ``internvl serve --tensor-parallel-size N`` under torchrun. Checks sizes and joins the group in
    the calling thread (before the server starts). Returns a loader for ``create_app`` on rank 0; on a
    worker it loads, follows rank 0 until stopped, and returns None (the caller then exits)."""
    tp = config.tensor_parallel_size
    world = env_world()
    if world is None:
        raise TensorParallelError(f"--tensor-parallel-size {tp} needs one process per rank: launch with "
                                  f"`torchrun --nproc-per-node {tp} -m internvl_runtime serve ...` (and --nnodes / "
                                  "--rdzv-endpoint across machines)")
    rank, world_size, local_rank = world
    check_launch(tp, world_size, device=config.device)
    check_tensor_parallel(InternVLConfig.from_pretrained(config.model), tp)
    group = init_group(rank=rank, world_size=world_size, local_rank=local_rank, device=config.device,
                       timeout_s=timeout_s)
    if not group.is_driver:
        try:
            start_rank(config.model, group, dtype=config.dtype)
        except TensorParallelError as exc:
            _exit_group(exc)
        group.destroy()
        return None

    def load() -> AsyncEngine:
        rank0 = start_rank(config.model, group, dtype=config.dtype,
                           engine_config=EngineConfig(**config.engine_kwargs()), on_failure=_exit_group)
        assert rank0 is not None, "this process is rank 0"
        atexit.register(rank0.runner.close)      # server shut down: release the workers (exit 0 everywhere)
        return AsyncEngine(rank0.engine, max_queue_len=config.max_queue_len)

    return load
