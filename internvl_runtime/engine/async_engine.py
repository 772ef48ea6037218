"""AsyncEngine: one background thread owns the model, the scheduler and the KV cache.

Threading rule (see ARCHITECTURE.md): request handlers (asyncio) parse JSON, fetch and decode images,
render templates and tokenize (``InputProcessor``), then hand a ``PreparedRequest`` to ``generate``. Only
the engine thread calls ``LLMEngine`` methods; handlers talk to it through a command queue, and it
answers through each request's asyncio queue (``loop.call_soon_threadsafe``).

Example::

    engine = AsyncEngine(LLMEngine(model, tokenizer))
    async for out in engine.generate("r1", prepared, SamplingParams(max_new_tokens=32)):
        print(out.delta, end="")
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..errors import EngineOverloaded, InternVLError
from ..processing.inputs import PreparedRequest
from .engine import LLMEngine, RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineMetrics:
    """Counters for /metrics (Prometheus text)."""

    requests_total: int = 0
    requests_failed: int = 0
    requests_aborted: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    ttft_seconds: list[float] = field(default_factory=list)  # last 1000

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_seconds.append(seconds)
        del self.ttft_seconds[:-1000]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, max_queue_len: int = 256) -> None:
        self.engine = engine
        self.max_queue_len = max_queue_len
        self.metrics = EngineMetrics()
        self._commands: queue.Queue[tuple] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="internvl-engine", daemon=True)
        self._thread.start()

    # -- public ----------------------------------------------------------------------------------
    @property
    def num_pending(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    async def generate(self, request_id: str, request: PreparedRequest, params: SamplingParams
                       ) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request. Leaving the iteration early (client gone) aborts it."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if len(self._streams) >= self.max_queue_len:
                raise EngineOverloaded(f"the engine has {len(self._streams)} requests in flight "
                                       f"(limit {self.max_queue_len}); retry later")
            self._streams[request_id] = (loop, outputs)
        accepted: Future = Future()
        self._commands.put(("add", request_id, request, params, accepted, time.monotonic()))
        finished = False
        try:
            await asyncio.wrap_future(accepted)          # raises the engine's validation error, if any
            self.metrics.requests_total += 1
            while True:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.metrics.requests_aborted += 1
                self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def call(self, fn, *args):
        """Run ``fn(engine, *args)`` on the engine thread and return a concurrent Future of its result."""
        future: Future = Future()
        self._commands.put(("call", fn, args, future))
        return future

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped.set()
        self._commands.put(("stop",))
        self._thread.join(timeout)

    # -- engine thread ---------------------------------------------------------------------------
    def _emit(self, request_id: str, item: object) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the handler's loop is closed: drop the request
                self._commands.put(("abort", request_id))

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, request, params, accepted, arrival = command
            with self._lock:
                alive = request_id in self._streams
            if not alive:
                accepted.cancel()
                return
            try:
                self.engine.add_request(request_id, request, params, arrival_time=arrival)
            except Exception as exc:  # noqa: BLE001 - reported to the caller, engine keeps serving
                self.metrics.requests_failed += 1
                accepted.set_exception(exc)
                return
            accepted.set_result(True)
        elif kind == "abort":
            self.engine.abort_request(command[1])
        elif kind == "call":
            _, fn, args, future = command
            try:
                future.set_result(fn(self.engine, *args))
            except Exception as exc:  # noqa: BLE001
                future.set_exception(exc)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                command = self._commands.get(timeout=None if not self.engine.has_unfinished_requests() else 0)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    return
                self._handle(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except InternVLError as exc:
                logger.exception("engine step failed")
                self._fail_all(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - keep serving; fail the requests in flight
                logger.exception("engine step crashed")
                self._fail_all(exc)
                continue
            for out in outputs:
                self.metrics.generation_tokens_total += len(out.new_token_ids)
                if out.first_token_time is not None and len(out.token_ids) == len(out.new_token_ids):
                    self.metrics.prompt_tokens_total += out.num_prompt_tokens
                    self.metrics.observe_ttft(out.first_token_time - out.arrival_time)
                self._emit(out.request_id, out)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            ids = list(self._streams)
        for request_id in ids:
            self.engine.abort_request(request_id)
            self._emit(request_id, exc)
