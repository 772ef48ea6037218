"""Lock-step execution: rank 0 drives, the workers follow.

Rank 0 runs the whole engine (scheduler, vision encoder, sampling, HTTP). Its runner is a
:class:`TensorParallelRunner`: before each model step it broadcasts the step (token ids, positions,
block tables, and the image feature rows as one tensor) to the workers, then runs its own share; every
rank then executes the same forward, meeting at the same all-reduces. The workers sit in
:func:`run_worker`: receive, execute, repeat, until a ``stop`` message.

Messages on the control group (frozen dataclasses, pickled), in order::

    Setup(num_blocks, block_size, kv_dtype, image_token_id)      once
    Step(steps: [StepMeta], feature_shape, feature_dtype)        per engine step (features follow as one tensor)
    Heartbeat()                                                  when rank 0 is idle
    Stop()                                                       once

Heartbeats: a worker waits for the next message under the collective timeout, so an idle rank 0 sends
one every ``heartbeat_s`` (a quarter of the timeout, at most 30 s). A rank that dies therefore ends the
others within the timeout at worst (gloo: at once, the connection closes), with
:class:`TensorParallelError`, never a hang.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch

from ..engine.kv_groups import KVCacheGroup
from ..engine.model_runner import ModelRunner, SequenceStep
from ..models.internvl import InternVLModel
from .parallel_state import TensorParallelError, TPGroup

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """Once, first: how the workers size their KV cache and where image features go."""

    num_blocks: int
    block_size: int
    kv_dtype: torch.dtype
    image_token_id: int | None
    kv_groups: tuple[KVCacheGroup, ...] | None = None    # rank 0's runner's (engine.kv_groups)


@dataclass(frozen=True)
class StepMeta:
    """One sequence of a step (``SequenceStep``) without its image features: ``feature_rows`` of them
    follow in the step's feature tensor."""

    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    want_logits: bool
    positions: list[int] | None
    feature_rows: int
    other_block_tables: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class Step:
    """One engine step; with features, a tensor of ``feature_shape`` / ``feature_dtype`` is broadcast next."""

    steps: list[StepMeta]
    feature_shape: tuple[int, ...] | None
    feature_dtype: torch.dtype | None


@dataclass(frozen=True)
class Heartbeat:
    """Rank 0 is idle but alive."""


@dataclass(frozen=True)
class Stop:
    """Leave the loop."""


ControlMessage: TypeAlias = Setup | Step | Heartbeat | Stop


def _pack(steps: list[SequenceStep]) -> tuple[list[StepMeta], torch.Tensor | None]:
    meta: list[StepMeta] = []
    features: list[torch.Tensor] = []
    for s in steps:
        rows = 0 if s.image_features is None else int(s.image_features.shape[0])
        meta.append(StepMeta(token_ids=list(s.token_ids), num_computed=s.num_computed,
                             block_table=list(s.block_table), want_logits=s.want_logits,
                             positions=None if s.positions is None else list(s.positions), feature_rows=rows,
                             other_block_tables=[list(t) for t in s.other_block_tables]))
        if s.image_features is not None and rows:
            features.append(s.image_features)
    if not features:
        return meta, None
    return meta, features[0] if len(features) == 1 else torch.cat(features)


def _unpack(meta: list[StepMeta], features: torch.Tensor | None) -> list[SequenceStep]:
    steps, start = [], 0
    for m in meta:
        feats = None
        if m.feature_rows:
            assert features is not None
            feats, start = features[start:start + m.feature_rows], start + m.feature_rows
        steps.append(SequenceStep(token_ids=m.token_ids, num_computed=m.num_computed, block_table=m.block_table,
                                  image_features=feats, want_logits=m.want_logits, positions=m.positions,
                                  other_block_tables=m.other_block_tables))
    return steps


class TensorParallelRunner:
    """Rank 0's runner: the ``ModelRunner`` interface, broadcasting each step to the workers first.

    ``on_failure(exc)`` is called when a collective fails (a rank died); the server passes one that ends
    the process so torchrun stops the group; offline use gets the :class:`TensorParallelError`.
    """

    def __init__(self, runner: ModelRunner, group: TPGroup, *,
                 on_failure: Callable[[BaseException], None] | None = None, heartbeat_s: float | None = None) -> None:
        self.runner, self.group, self.on_failure = runner, group, on_failure
        self.heartbeat_s = heartbeat_s or max(0.5, min(30.0, group.timeout_s / 4))
        self._lock = threading.Lock()
        self._last_sent = time.monotonic()
        self._closed = threading.Event()
        self._failed: BaseException | None = None
        self._send(Setup(num_blocks=runner.kv_cache.num_blocks, block_size=runner.block_size,
                         kv_dtype=runner.dtype, image_token_id=runner.image_token_id, kv_groups=runner.kv_groups))
        self._beat = threading.Thread(target=self._heartbeats, name="tp-heartbeat", daemon=True)
        self._beat.start()

    def __getattr__(self, name: str) -> Any:      # block_size, kv_cache, device, dtype ... of the local runner
        return getattr(self.runner, name)

    @property
    def failed(self) -> BaseException | None:
        """The collective failure that ended the group (a rank died), if one did."""
        return self._failed

    def _send(self, message: ControlMessage) -> None:
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message: ControlMessage) -> None:
        if self._failed is not None:
            raise TensorParallelError(f"the tensor-parallel group has failed earlier: {self._failed}")
        try:
            self.group.broadcast_object(message)
        except TensorParallelError as exc:
            self._fail(exc)
            raise
        self._last_sent = time.monotonic()

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        self._closed.set()
        logger.error("%s", exc)
        if self.on_failure is not None:
            self.on_failure(exc)

    def _heartbeats(self) -> None:
        while not self._closed.wait(self.heartbeat_s / 2):
            if time.monotonic() - self._last_sent < self.heartbeat_s:
                continue
            try:
                with self._lock:
                    if not self._closed.is_set():
                        self._send_locked(Heartbeat())
            except TensorParallelError:
                return

    def execute(self, steps: list[SequenceStep]) -> torch.Tensor:
        meta, features = _pack(steps)
        with self._lock:
            shape = None if features is None else tuple(features.shape)
            dtype = None if features is None else features.dtype
            self._send_locked(Step(meta, shape, dtype))
            try:
                if features is not None:
                    self.group.broadcast_tensor(features.to(self.group.device).contiguous())
                return self.runner.execute(steps)
            except TensorParallelError as exc:
                self._fail(exc)
                raise

    def close(self) -> None:
        """Tell the workers to leave their loop (idempotent; harmless when the group already failed)."""
        if self._closed.is_set():
            return
        try:
            with self._lock:
                self._closed.set()
                if self._failed is None:
                    self.group.broadcast_object(Stop())
        except TensorParallelError as exc:
            logger.warning("could not stop the workers cleanly: %s", exc)


def run_worker(model: InternVLModel, group: TPGroup) -> None:
    """A worker's whole life after loading: follow rank 0's steps until ``Stop``. Raises
    :class:`TensorParallelError` if rank 0 (or any rank) dies."""
    setup = group.broadcast_object()
    if not isinstance(setup, Setup):
        raise TensorParallelError(f"rank 0 sent {type(setup).__name__} where Setup comes first")
    runner = ModelRunner(model, num_blocks=setup.num_blocks, block_size=setup.block_size,
                         kv_dtype=setup.kv_dtype, image_token_id=setup.image_token_id,
                         enforce_eager=True,      # as rank 0's: the all-reduces are not captured
                         kv_groups=setup.kv_groups)
    with torch.inference_mode():
        while True:
            message = group.broadcast_object()
            if isinstance(message, Stop):
                return
            if isinstance(message, Heartbeat):
                continue
            if not isinstance(message, Step):
                raise TensorParallelError(f"rank 0 sent an unknown control message: {type(message).__name__}")
            features = None
            if message.feature_shape is not None:
                features = group.broadcast_tensor(torch.empty(message.feature_shape, dtype=message.feature_dtype,
                                                              device=group.device))
            runner.execute(_unpack(message.steps, features))
